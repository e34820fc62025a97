"""``bench/int8_speed.py --ports``: which int8 quantisation holds, measured side by side with fp32.

Each variant quantises the fp32 export's encoder and alignment graphs with
``casam_export.quantize.quantize_model`` (the exporter's own code) and a ``QuantConfig``,
written into a copy of the export folder; "minmax+x64" is the min-max graph run with
onnxruntime's ``session.x64quantprecision`` session option. See int8_speed.py for the command.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import onnx

from common import RESULTS, Table, start, write_record
from infer_latency import inputs, interleaved
from int8_speed import REAL, iou, real_cases

from casam_core.files import read_json, sha256_file
from casam_export.quantize import QuantConfig, quantize_model
from runtime.cpu_class import int8_kernel_class
from runtime.pipeline import STAGES, Pipeline
from runtime.preprocess import Preprocessing, preprocess
from runtime.prompts import Prompts

VARIANTS: dict[str, QuantConfig] = {
    "minmax": QuantConfig("minmax"),
    "minmax+reduce_range": QuantConfig("minmax", reduce_range=True),
    "percentile": QuantConfig("percentile"),
    "entropy": QuantConfig("entropy"),
}
X64 = "minmax+x64quantprecision"


def calibration_images(count: int, prep: Preprocessing) -> list[np.ndarray]:
    """``count`` real images none of which ``real_cases`` measures (it takes every 7th from 0)."""
    folders = sorted(p for p in REAL.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir())
    out = []
    for i in range(count):
        images = sorted((folders[i % len(folders)] / "images").iterdir())
        out.append(prep.read(images[(3 + 7 * (i // len(folders))) % len(images)])[0])
    return out


def variant_folder(fp32: Path, dst: Path, config: QuantConfig, calib: list[np.ndarray], pipe: Pipeline) -> Path:
    """A copy of the fp32 export whose encoder and alignment graphs are quantised with ``config``."""
    shutil.copytree(fp32, dst)
    manifest = read_json(dst / "manifest.json")
    prep = pipe.preprocessing
    embeddings = [pipe.embed(img)[0] for img in calib]
    entries = {"encoder": manifest["graphs"]["encoder"], **{f"align/{t['name']}": t["align"] for t in manifest["tasks"]}}
    for key, entry in entries.items():
        feeds = ([{"image": preprocess(img, prep)[0]} for img in calib] if key == "encoder"
                 else [{"embeddings": e} for e in embeddings])
        model = quantize_model(onnx.load(str(fp32 / entry["file"])), feeds, config)
        name = f"{key.replace('/', '_')}-int8.onnx"
        onnx.save_model(model, str(dst / name))
        entry.update(file=name, sha256=sha256_file(dst / name), precision="int8")
    manifest["precision"] = "int8"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@contextlib.contextmanager
def x64_sessions() -> Iterator[None]:
    """Sessions opened meanwhile set ``session.x64quantprecision`` (u8u8 products on non-VNNI CPUs)."""
    from runtime.backends import ort as ort_backend

    original = ort_backend.session_options

    def with_x64(ort: Any) -> Any:
        options = original(ort)
        options.add_session_config_entry("session.x64quantprecision", "1")
        return options

    ort_backend.session_options = with_x64
    try:
        yield
    finally:
        ort_backend.session_options = original


def agreement(ref: Pipeline, pipe: Pipeline, cases: list) -> dict[str, Any]:
    """Mask IoU, routes and the largest relative score change of ``pipe`` against ``ref``."""
    ious, same, rel = [], 0, 0.0
    for _, image, box in cases:
        prompts = Prompts.for_image(image.shape, boxes=box)
        a, b = ref.predict(image, prompts), pipe.predict(image, prompts)
        ious.append(iou(a.masks[0], b.masks[0]))
        same += a.route == b.route
        sa, sb = np.array(list(a.scores.values())), np.array(list(b.scores.values()))
        rel = max(rel, float((np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-6)).max()) if sa.size else 0.0)
    return {"images": len(ious), "iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
            "routes_agree": same, "score_max_rel_change": rel, "ious": [round(v, 4) for v in ious]}


def ports(fp32: Path, label: str, runs: int, real: int, out: Optional[Path], work: Path = Path("/tmp/casam_int8_ports")) -> None:
    """Quantise every variant, then measure quality and speed side by side; one record."""
    run = start(f"int8_speed_ports_{label}")
    shutil.rmtree(work, ignore_errors=True)
    ref = Pipeline.from_manifest(fp32, backend="ort-cpu")
    calib = calibration_images(8, ref.preprocessing)
    pipes: dict[str, Pipeline] = {"fp32": ref}
    for name, config in VARIANTS.items():
        pipes[name] = Pipeline.from_manifest(variant_folder(fp32, work / name, config, calib, ref), backend="ort-cpu")
        print(f"quantised {name}", flush=True)
    with x64_sessions():
        pipes[X64] = Pipeline.from_manifest(work / "minmax", backend="ort-cpu")
    cases = real_cases(real, ref.preprocessing)
    quality = {k: agreement(ref, p, cases) for k, p in pipes.items() if k != "fp32"}
    image, boxes = inputs()
    prompts, task = Prompts.for_image(image.shape, boxes=boxes[:1]), ref.task_names[0]
    rows = interleaved({k: (lambda p=p: p.predict(image, prompts, task=task).timings_ms) for k, p in pipes.items()}, runs)
    speed = {k: {s: statistics.median(t[s] for t, _ in v) for s in STAGES} for k, v in rows.items()}
    table = Table.of("variant", ("total ms", "{:.1f}"), ("encoder ms", "{:.1f}"), ("align ms", "{:.1f}"),
                     ("speed-up vs fp32", "{:.2f}"), ("mean IoU", "{:.4f}"), ("min IoU", "{:.4f}"), "routes",
                     ("largest score change", "{:.4f}"))
    for k in pipes:
        q = quality.get(k)
        table.add(k, speed[k]["total"], speed[k]["encoder"], speed[k]["align"], speed["fp32"]["total"] / speed[k]["total"],
                  q["iou_mean"] if q else None, q["iou_min"] if q else None,
                  f"{q['routes_agree']}/{q['images']}" if q else "-", q["score_max_rel_change"] if q else None)
    notes = [f"int8 kernel class {int8_kernel_class()}; {len(cases)} real images, one box from each mask; "
             f"calibrated on {len(calib)} other real images; medians of {runs} interleaved runs"]
    write_record(run, {"variants": table}, setup=f"fp32 export {fp32}", notes=notes, folder=out or RESULTS)
