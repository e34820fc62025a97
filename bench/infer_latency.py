"""Inference latency: the torch-free runtime (ORT CPU) against PyTorch eager CA-SAM.

Measured in one run on the same inputs, side by side:
  1. end to end and per stage (preprocess, encoder, router, align, decoder, postprocess),
     runtime vs PyTorch eager, for the tiny SAM and vit_b with random weights;
  2. the router (attention pooling + every VAE) with 1, 9 and 100 tasks, against the vit_b
     encoder's time;
  3. eight boxes in one decoder call against eight separate calls (runtime and eager);
  4. peak RSS of a `casam-infer` process on the vit_b fp32 export.

    .venv/bin/python bench/infer_latency.py [--models tiny,vit_b] [--runs 7] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from encoder_time import median_ms  # noqa: E402
from export_size_time import make_bundle  # noqa: E402  (random-weight bundles, one implementation)

from casam_export import export_bundle  # noqa: E402
from casam_export.graphs import GraphSpec, export_graph, finalize, router_spec, write_graph  # noqa: E402
from models.router import Router  # noqa: E402
from models.sam_loader import load_frozen_sam  # noqa: E402
from models.vae import TaskVAE  # noqa: E402
from runtime.backends import OrtBackend  # noqa: E402
from runtime.pipeline import STAGES, Pipeline  # noqa: E402
from runtime.preprocess import boxes_to_frame, preprocess  # noqa: E402
from runtime.prompts import Prompts, encode_prompts  # noqa: E402
from casam_bundle import Bundle  # noqa: E402
from models.bundle_models import build_model  # noqa: E402



def inputs() -> tuple[np.ndarray, np.ndarray]:
    """A 768×1024 RGB image with smooth structure, and eight boxes on it."""
    yy, xx = np.mgrid[0:768, 0:1024].astype(np.float32)
    rng = np.random.default_rng(0)
    image = np.stack([128 + 100 * np.sin(xx / 37), 128 + 100 * np.cos(yy / 23), (xx + yy) % 256], -1)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    boxes = np.array([[40 + 100 * i, 30 + 60 * i, 240 + 90 * i, 260 + 50 * i] for i in range(8)], np.float32)
    return image, boxes


@torch.no_grad()
def eager_stages(model, sam, prep, image: np.ndarray, boxes: np.ndarray, task: str) -> dict[str, float]:
    """One PyTorch eager prediction, timed per stage like Pipeline.predict."""
    ms: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        ms[name] = (now - t) * 1000.0
        t = now

    start = t
    x, frame = preprocess(image, prep)
    xt = torch.from_numpy(x)
    prompts = Prompts.for_image(image.shape, boxes=boxes)
    lap("preprocess")
    emb = model.encode(xt)
    lap("encoder")
    _, scores, routes = model.route(emb, task)
    lap("router")
    aligned = model.align(emb, int(routes[0]))
    lap("align")
    low, _ = model.decode(aligned, prompts, frame.scale_xy)
    lap("decoder")
    (sam.postprocess_masks(low, frame.resized_hw, frame.original_hw) > 0).numpy()
    lap("postprocess")
    ms["total"] = (time.perf_counter() - start) * 1000.0
    return ms


def exported(model_name: str, work: Path) -> tuple[Bundle, Optional[Path], Path]:
    """A 2-task random-weight bundle of ``model_name`` and its fp32 export under ``work``
    (bundle, checkpoint, engines); kept there and brought up to date on later calls."""
    folder = work / model_name
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "bundle").exists():
        ckpt: Optional[Path] = folder / f"{model_name}-random.safetensors"
        bundle, ckpt = Bundle.open(folder / "bundle"), (ckpt if ckpt.exists() else None)
    else:
        bundle, ckpt, _ = make_bundle(folder, model_name)
    export_bundle(bundle.root, folder / "engines", verify=False, checkpoint=ckpt, quiet=True)
    return bundle, ckpt, folder / "engines"


def export_fp32_graph(module: torch.nn.Module, spec: GraphSpec, folder: Path, name: str) -> Path:
    """One graph through the exporter's own steps (opset 18, fp32), outside a bundle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dynamo exporter's tracing chatter
        written = write_graph(finalize(export_graph(module, spec, 18, 16), fp16=False), spec, folder, name)
    return folder / written.file


#: Pause before each timed call (not timed): longer than a spinning thread pool keeps spinning.
SETTLE_S = 0.2


def interleaved(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[tuple[Any, float]]]:
    """Each function once as a warm-up, then ``runs`` rounds of one call each, in turn.

    Taking turns puts the runtime and the eager model under the same background load,
    which on a shared machine moves by more than the differences being measured. Each
    call starts after a pause of SETTLE_S, so that it does not share the cores with the
    previous call's thread pool (torch's OpenMP threads and onnxruntime's pool spin for a
    while after their work). Returns each function's (result, wall ms) per round.
    """
    for fn in fns.values():
        fn()
    out: dict[str, list[tuple[Any, float]]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            value = fn()
            out[name].append((value, (time.perf_counter() - t0) * 1000.0))
    return out


def end_to_end(model_name: str, work: Path, runs: int) -> dict[str, Any]:
    bundle, ckpt, engines = exported(model_name, work)
    sam = load_frozen_sam(model_name, ckpt).model
    model = build_model(bundle, sam)
    pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    image, boxes = inputs()
    box = boxes[:1]

    rows = interleaved({"runtime": lambda: pipe.predict(image, Prompts.for_image(image.shape, boxes=box), task="alpha").timings_ms,
                        "eager": lambda: eager_stages(model, sam, bundle.preprocessing, image, box, "alpha")}, runs)
    med = lambda rows, k: statistics.median(timings[k] for timings, _ in rows)  # noqa: E731
    stages = {k: (med(rows["runtime"], k), med(rows["eager"], k)) for k in STAGES}

    # Eight boxes: one decoder call with K=8 against eight calls with K=1, on the same embedding.
    emb, frame = pipe.embed(image)
    coords, labels = encode_prompts(boxes_to_frame(boxes, frame))
    dec = pipe.decoder
    feeds = lambda s: {"embeddings": emb, "point_coords": coords[s], "point_labels": labels[s]}  # noqa: E731
    et = torch.from_numpy(emb)
    ct, lt = torch.from_numpy(coords), torch.from_numpy(labels)

    def eager_decoder(s: slice) -> None:
        with torch.no_grad():
            model.decoder(et, ct[s], lt[s])

    calls = interleaved({
        "runtime batched": lambda: dec.run(feeds(slice(0, 8))),
        "runtime separate": lambda: [dec.run(feeds(slice(i, i + 1))) for i in range(8)],
        "eager batched": lambda: eager_decoder(slice(0, 8)),
        "eager separate": lambda: [eager_decoder(slice(i, i + 1)) for i in range(8)],
    }, max(runs, 5))
    m = {k: statistics.median(ms for _, ms in v) for k, v in calls.items()}
    return {"model": model_name, "stages": stages, "runs": runs,
            "boxes": {"runtime": (m["runtime batched"], m["runtime separate"]),
                      "eager": (m["eager batched"], m["eager separate"])},
            "engines": engines}


def router_scaling(work: Path, runs: int) -> list[tuple[int, float, float]]:
    """(tasks, runtime router ms, eager router ms) on one 1×256×64×64 embedding."""
    rows = []
    emb = np.random.default_rng(1).normal(size=(1, 256, 64, 64)).astype(np.float32)
    backend = OrtBackend("ort-cpu")
    for n in (1, 9, 100):
        torch.manual_seed(n)
        router = Router([TaskVAE() for _ in range(n)]).eval()
        engine = backend.load("router", export_fp32_graph(router, router_spec(n), work / "routers", f"router{n}.onnx"))
        rt = median_ms(lambda: engine.run({"embeddings": emb}), max(runs, 20))
        with torch.no_grad():
            et = torch.from_numpy(emb)
            eg = median_ms(lambda: router(et), max(runs, 20))
        rows.append((n, rt, eg))
    return rows


# Runs casam-infer in a fresh interpreter and reports VmHWM, the peak RSS of that process's
# own address space. (ru_maxrss of a child is useless here: a child forked from this large
# benchmark process starts with the parent's resident pages, and Linux keeps that peak
# across exec.)
RSS_PROBE = """
import atexit, sys
def report():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(sys.argv[1], 'w').write(line.split()[1])
atexit.register(report)
from casam_infer.cli import main
main(sys.argv[2:])
"""


def peak_rss_mb(engines: Path, work: Path) -> float:
    """Peak resident memory of one casam-infer run on a 768×1024 image with one box."""
    from PIL import Image

    image, _ = inputs()
    Image.fromarray(image).save(work / "rss.png")
    report = work / "rss_kb.txt"
    cmd = [sys.executable, "-c", RSS_PROBE, str(report), str(work / "rss.png"), "--box", "40", "30", "240", "260",
           "--engines", str(engines), "--backend", "ort-cpu", "--out", str(work / "rss_out"), "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(report.read_text()) / 1024.0


SETUP = ("torch eager with its default threads against onnxruntime's CPUExecutionProvider, fp32, random weights. "
         "Input: one 768×1024 RGB image, one box, route forced to a task (alignment runs). Runtime and eager runs "
         "take turns after a warm-up each. Medians in ms; ratio = eager / runtime (> 1: the runtime is faster). "
         "Eight boxes on one embedding: one decoder call (K=8) against eight calls (K=1). Router: attention "
         "pooling and every task VAE, one image. Peak RSS: one `casam-infer` process, ORT CPU, fp32.")


def stage_tables(r: dict[str, Any]) -> dict[str, Table]:
    """A model's per-stage table and its eight-boxes table."""
    stages = Table.of("stage", ("runtime ms", "{:.1f}"), ("eager ms", "{:.1f}"), ("ratio", "{:.2f}×"))
    for k in STAGES:
        rt, eg = r["stages"][k]
        stages.add("**end to end**" if k == "total" else k, rt, eg, eg / rt)
    boxes = Table.of("", ("batched ms", "{:.1f}"), ("8 separate ms", "{:.1f}"), ("separate / batched", "{:.2f}×"))
    for side in ("runtime", "eager"):
        batched, separate = r["boxes"][side]
        boxes.add(side, batched, separate, separate / batched)
    return {r["model"]: stages, f"boxes_{r['model']}": boxes}


def tables(results: list[dict[str, Any]], routers, rss: dict[str, float], encoder_ms: dict[str, float]) -> dict[str, Table]:
    out: dict[str, Table] = {}
    for r in results:
        out.update(stage_tables(r))
    enc_name = "vit_b" if "vit_b" in encoder_ms else "tiny"
    enc = encoder_ms[enc_name]
    router = Table.of(("tasks", "{:d}"), ("runtime ms", "{:.2f}"), ("eager ms", "{:.2f}"),
                      (f"share of the {enc_name} runtime encoder ({enc:.0f} ms)", "{:.3f}%"))
    for n, rt, eg in routers:
        router.add(n, rt, eg, 100 * rt / enc)
    out[f"router_vs_{enc_name}"] = router
    if rss:
        out["rss"] = Table.of("model", ("peak RSS MB", "{:.0f}"))
        for m, v in rss.items():
            out["rss"].add(m, v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (vit_b uses min(runs, 3))")
    parser.add_argument("--work", type=Path, default=None, help="keep bundles and exports here (reused next time)")
    add_results_option(parser)
    args = parser.parse_args()
    run = start("infer_latency")
    work = args.work or Path(tempfile.mkdtemp(prefix="casam_infer_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results, rss, encoder_ms = [], {}, {}
    for name in args.models.split(","):
        runs = args.runs if name == "tiny" else min(args.runs, 3)
        print(f"[{name}] export + end-to-end ({runs} runs)…", flush=True)
        r = end_to_end(name, work, runs)
        results.append(r)
        encoder_ms[name] = r["stages"]["encoder"][0]
        print(f"[{name}] peak RSS…", flush=True)
        rss[name] = peak_rss_mb(r["engines"], work / name)
    print("router scaling…", flush=True)
    routers = router_scaling(work, args.runs)
    runs_note = ", ".join(f"{r['model']}: medians of {r['runs']} runs" for r in results)
    write_record(run, tables(results, routers, rss, encoder_ms), setup=f"{SETUP} {runs_note}.",
                 folder=args.results_dir)


if __name__ == "__main__":
    main()
