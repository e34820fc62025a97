"""``bench/int8_speed.py --ports``: which int8 quantisation holds, measured side by side with fp32.

Each variant quantises the fp32 export's encoder and alignment graphs with
``casam_export.quantize.quantize_model`` (the exporter's own code) and a ``QuantConfig``,
written into a copy of the export folder; "minmax+x64" is the min-max graph run with
onnxruntime's ``session.x64quantprecision`` session option. See int8_speed.py for the command.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import onnx

from cpu_peak import cpu_description, load_average
from infer_latency import inputs, interleaved
from int8_speed import REAL, iou, real_cases

from casam_core.files import atomic_write_text, read_json, sha256_file
from casam_export.quantize import QuantConfig, quantize_model
from casam_io.image_io import read_prepared
from runtime.cpu_class import int8_kernel_class
from runtime.pipeline import STAGES, Pipeline
from runtime.preprocess import preprocess

VARIANTS: dict[str, QuantConfig] = {
    "minmax": QuantConfig("minmax"),
    "minmax+reduce_range": QuantConfig("minmax", reduce_range=True),
    "percentile": QuantConfig("percentile"),
    "entropy": QuantConfig("entropy"),
}
X64 = "minmax+x64quantprecision"


def calibration_images(count: int, intensity: Any) -> list[np.ndarray]:
    """``count`` real images none of which ``real_cases`` measures (it takes every 7th from 0)."""
    folders = sorted(p for p in REAL.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir())
    out = []
    for i in range(count):
        images = sorted((folders[i % len(folders)] / "images").iterdir())
        out.append(read_prepared(images[(3 + 7 * (i // len(folders))) % len(images)], intensity)[0])
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
        a, b = ref.predict(image, boxes=box), pipe.predict(image, boxes=box)
        ious.append(iou(a.masks[0], b.masks[0]))
        same += a.route == b.route
        sa, sb = np.array(list(a.scores.values())), np.array(list(b.scores.values()))
        rel = max(rel, float((np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-6)).max()) if sa.size else 0.0)
    return {"images": len(ious), "iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
            "routes_agree": same, "score_max_rel_change": rel, "ious": [round(v, 4) for v in ious]}


def write_record(path: Path, record: dict[str, Any]) -> None:
    """The JSON record, written atomically. A local writer: bench/common.py (another branch)
    adds the shared one; the lead can switch this call to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def ports(fp32: Path, label: str, runs: int, real: int, out: Optional[Path], work: Path = Path("/tmp/casam_int8_ports")) -> None:
    load_before = load_average()
    shutil.rmtree(work, ignore_errors=True)
    ref = Pipeline.from_manifest(fp32, backend="ort-cpu")
    calib = calibration_images(8, ref.preprocessing.intensity)
    pipes: dict[str, Pipeline] = {"fp32": ref}
    for name, config in VARIANTS.items():
        pipes[name] = Pipeline.from_manifest(variant_folder(fp32, work / name, config, calib, ref), backend="ort-cpu")
        print(f"quantised {name}", flush=True)
    with x64_sessions():
        pipes[X64] = Pipeline.from_manifest(work / "minmax", backend="ort-cpu")
    cases = real_cases(real, ref.preprocessing.intensity)
    quality = {k: agreement(ref, p, cases) for k, p in pipes.items() if k != "fp32"}
    image, boxes = inputs()
    task = ref.task_names[0]
    rows = interleaved({k: (lambda p=p: p.predict(image, boxes=boxes[:1], task=task).timings_ms) for k, p in pipes.items()}, runs)
    speed = {k: {s: statistics.median(t[s] for t, _ in v) for s in STAGES} for k, v in rows.items()}
    model, flags = cpu_description()
    record = {"bench": "int8_speed --ports", "label": label, "written_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "cpu": model, "flags": flags, "int8_kernel_class": int8_kernel_class(), "cores": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": load_average(), "runs": runs,
              "real_images": [n for n, _, _ in cases], "calibration_images": len(calib),
              "speed_ms": speed, "speedup_vs_fp32": {k: speed["fp32"]["total"] / v["total"] for k, v in speed.items()},
              "quality_vs_fp32": quality}
    path = out or Path(__file__).resolve().parent / "results" / f"int8_speed_ports_{label}.json"
    write_record(path, record)
    for k in pipes:
        q = quality.get(k, {})
        print(f"{k:<26} total {speed[k]['total']:7.1f} ms  encoder {speed[k]['encoder']:6.1f}  align {speed[k]['align']:6.1f}"
              f"  x{record['speedup_vs_fp32'][k]:.2f}" + (f"  IoU {q['iou_mean']:.4f}/{q['iou_min']:.4f}  routes "
              f"{q['routes_agree']}/{q['images']}  score Δ {q['score_max_rel_change']:.4f}" if q else ""))
    print(path)
