"""One-shot GPU suite: PyTorch eager against casam's runtime, on one device, in one command.

For each SAM variant (--sam: tiny, vit_b by default; mobile_sam, efficientvit_sam_l0…; random weights, 2 tasks), side by side in one run:
  - the encoder alone, and the whole chain (preprocess → encoder → router → align →
    decoder → masks at the original size), one 768×1024 image, one box, route forced to a task;
  - eight boxes on one embedding: one decoder call against eight calls;
  - the router (attention pooling + every VAE) at 100 tasks;
for PyTorch eager fp32 and bf16 (autocast) against casam on onnxruntime fp32 and fp16
(CUDA provider; fp16 graphs from ``casam-export --fp16``). Writes one JSON and one Markdown
table, checks the GPU targets and says which were met.

On a GPU machine (../shared/docs/DEVICE.md says how to carry onnxruntime-gpu there):

    .venv/bin/python bench/gpu_suite.py --device cuda --work /tmp/gpu_suite

``--device cpu`` runs the same plumbing on the CPU (the tiny seeded variants only, fp32 graphs: onnxruntime's CPU
provider has no fast fp16 kernels), which is how the test suite checks it before GPU time
is spent.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from export_size_time import make_bundle  # noqa: E402  (random-weight bundles, one implementation)
from infer_latency import export_fp32_graph, inputs  # noqa: E402

from casam_bundle import Bundle  # noqa: E402
from casam_export import export_bundle  # noqa: E402
from casam_export.graphs import router_spec  # noqa: E402
from models.bundle_models import build_model  # noqa: E402
from models.router import Router  # noqa: E402
from models.sam_loader import SAM_SPECS, load_frozen_sam  # noqa: E402
from models.vae import TaskVAE  # noqa: E402
from runtime.backends import OrtBackend  # noqa: E402
from casam_core.files import atomic_write_json, atomic_write_text  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.preprocess import boxes_to_frame, preprocess  # noqa: E402
from runtime.prompts import Prompts, encode_prompts  # noqa: E402

ROUTER_TASKS = 100
#: The GPU targets: chain ≤ 1.3× the encoder, ≥ 3× eager fp32, 8 boxes ≥ 3× faster batched.
TARGETS = {"chain_over_encoder_max": 1.3, "chain_vs_eager_fp32_min": 3.0, "boxes_separate_over_batched_min": 3.0}


class Clock:
    """Wall-clock medians that wait for the device (CUDA work is asynchronous)."""

    def __init__(self, device: str, runs: int, warmups: int = 1) -> None:
        self.device, self.runs, self.warmups = device, runs, warmups

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmups):  # cuDNN autotuning, ORT arena growth
            fn()
        self.sync()
        times = []
        for _ in range(self.runs):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)


def prepared(model_name: str, work: Path, precisions: list[str], bundle_dir: Optional[Path],
             engines: dict[str, Path]) -> tuple[Bundle, Optional[Path], dict[str, Path]]:
    """The bundle and one export per precision: given ones, else made (and kept) under work."""
    if bundle_dir is not None:
        bundle, ckpt = Bundle.open(bundle_dir), None
    else:
        folder = work / model_name
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = folder / f"{model_name}-random.safetensors"
        if (folder / "bundle").exists():
            bundle, ckpt = Bundle.open(folder / "bundle"), (ckpt if ckpt.exists() else None)
        else:
            bundle, ckpt, _ = make_bundle(folder, model_name)
    out = dict(engines)
    for precision in precisions:
        if precision not in out:
            out[precision] = work / model_name / f"engines-{precision}"
            export_bundle(bundle.root, out[precision], fp16=precision == "fp16", verify=False, checkpoint=ckpt,
                          trt=False, quiet=True)
    return bundle, ckpt, out


def eager_chain(model, sam, prep, image: np.ndarray, boxes: np.ndarray, device: str) -> None:
    """PyTorch eager CA-SAM on one image, masks brought back to the host like the runtime's."""
    x, frame = preprocess(image, prep)
    emb = model.encode(torch.from_numpy(x).to(device))
    _, _, routes = model.route(emb, "alpha")
    low, _ = model.decode(model.align(emb, int(routes[0])), Prompts.for_image(image.shape, boxes=boxes), frame.scale_xy)
    (sam.postprocess_masks(low.float(), frame.resized_hw, frame.original_hw) > 0).cpu().numpy()


def measure_model(model_name: str, device: str, clock: Clock, work: Path, precisions: list[str],
                  bundle_dir: Optional[Path], engines: dict[str, Path]) -> dict[str, Any]:
    bundle, ckpt, exports = prepared(model_name, work, precisions, bundle_dir, engines)
    sam = load_frozen_sam(model_name, ckpt).model.to(device)
    model = build_model(bundle, sam).to(device).eval()
    image, boxes = inputs()
    x = torch.from_numpy(preprocess(image, bundle.preprocessing)[0]).to(device)
    rows: dict[str, dict[str, float]] = {}
    modes = {"eager fp32": nullcontext, "eager bf16": lambda: torch.autocast(device, dtype=torch.bfloat16)}
    for label, ctx in modes.items():
        with torch.no_grad(), ctx():
            emb = model.encode(x)
            coords, labels = encode_prompts(boxes_to_frame(boxes, preprocess(image, bundle.preprocessing)[1]))
            ct, lt = torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device)
            rows[label] = {
                "encoder_ms": clock.median_ms(lambda: model.encode(x)),
                "chain_ms": clock.median_ms(lambda: eager_chain(model, sam, bundle.preprocessing, image, boxes[:1], device)),
                "boxes8_batched_ms": clock.median_ms(lambda: model.decoder(emb, ct, lt)),
                "boxes8_separate_ms": clock.median_ms(lambda: [model.decoder(emb, ct[i:i + 1], lt[i:i + 1]) for i in range(8)]),
            }
    backend = "ort-cuda" if device == "cuda" else "ort-cpu"
    for precision, folder in exports.items():
        pipe = Pipeline.from_manifest(folder, backend=backend)
        xs, frame = preprocess(image, bundle.preprocessing)
        emb_dev = pipe._encode(xs)  # kept on the device by the CUDA backend, as in predict
        coords, labels = encode_prompts(boxes_to_frame(boxes, frame))
        dec = lambda s: pipe.decoder.run({"embeddings": emb_dev, "point_coords": coords[s], "point_labels": labels[s]})  # noqa: E731
        rows[f"casam {backend} {precision}"] = {
            "encoder_ms": clock.median_ms(lambda: pipe.backend.to_numpy(pipe._encode(xs))),
            "chain_ms": clock.median_ms(lambda: pipe.predict(image, Prompts.for_image(image.shape, boxes=boxes[:1]), task="alpha")),
            "boxes8_batched_ms": clock.median_ms(lambda: dec(slice(0, 8))),
            "boxes8_separate_ms": clock.median_ms(lambda: [dec(slice(i, i + 1)) for i in range(8)]),
        }
    return {"model": model_name, "rows": rows}


def router_many(device: str, clock: Clock, work: Path, backend: str, tasks: int,
                bundle: Optional[Bundle] = None, engines: Optional[Path] = None) -> dict[str, float]:
    """The router at ``tasks`` tasks on one embedding: runtime against eager fp32.
    ``tasks`` 0 measures the given export's own router instead of exporting a new one."""
    emb = np.random.default_rng(1).normal(size=(1, 256, 64, 64)).astype(np.float32)
    if tasks == 0 and bundle is not None and engines is not None:
        from models.bundle_models import build_router

        from runtime.manifest import Manifest

        path = Manifest.load(engines, verify=False).graphs["router"].path
        router, tasks = build_router(bundle).eval(), len(bundle.task_names)
    else:
        torch.manual_seed(tasks)
        router = Router([TaskVAE() for _ in range(tasks)]).eval()
        path = work / "routers" / f"router{tasks}.onnx"
        if not path.exists():
            path = export_fp32_graph(router, router_spec(tasks), work / "routers", path.name)
    engine = OrtBackend(backend).load("router", path)
    et = torch.from_numpy(emb).to(device)
    router = router.to(device)
    with torch.no_grad():
        eager = clock.median_ms(lambda: router(et))
    return {"tasks": tasks, "runtime_ms": clock.median_ms(lambda: engine.run({"embeddings": emb})), "eager_fp32_ms": eager}


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """The GPU targets against the fastest casam row of each model."""
    out = {}
    for m in result["models"]:
        casam = min((r for k, r in m["rows"].items() if k.startswith("casam")), key=lambda r: r["chain_ms"])
        eager = m["rows"]["eager fp32"]
        chain_over_encoder = casam["chain_ms"] / casam["encoder_ms"]
        vs_eager = eager["chain_ms"] / casam["chain_ms"]
        boxes = casam["boxes8_separate_ms"] / casam["boxes8_batched_ms"]
        out[m["model"]] = {
            "chain_over_encoder": chain_over_encoder, "chain_vs_eager_fp32": vs_eager, "boxes8_separate_over_batched": boxes,
            "met": {"chain_over_encoder": chain_over_encoder <= TARGETS["chain_over_encoder_max"],
                    "chain_vs_eager_fp32": vs_eager >= TARGETS["chain_vs_eager_fp32_min"],
                    "boxes8": boxes >= TARGETS["boxes_separate_over_batched_min"]},
        }
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU, load average " + \
        ", ".join(f"{x:.1f}" for x in os.getloadavg())


def tables(result: dict[str, Any]) -> dict[str, Table]:
    """The suite's figures as record tables (the same cells the Markdown shows)."""
    chains = Table.of("model", "engine", ("encoder", "{:.1f}"), ("whole chain", "{:.1f}"), ("8 boxes batched", "{:.1f}"),
                      ("8 boxes, 8 calls", "{:.1f}"))
    for m in result["models"]:
        for label, r in m["rows"].items():
            chains.add(m["model"], label, r["encoder_ms"], r["chain_ms"], r["boxes8_batched_ms"], r["boxes8_separate_ms"])
    r = result["router"]
    router = Table.of(f"router at {r['tasks']} tasks (one embedding)", ("runtime ms", "{:.2f}"),
                      ("eager fp32 ms", "{:.2f}"))
    router.add(result["device"], r["runtime_ms"], r["eager_fp32_ms"])
    targets = Table.of("model", "chain / encoder (≤ 1.3)", "eager fp32 / chain (≥ 3)", "8 calls / batched (≥ 3)")
    mark = lambda ok: "met" if ok else "missed"  # noqa: E731
    for name, v in result["targets"].items():
        targets.add(name, f"{v['chain_over_encoder']:.2f} ({mark(v['met']['chain_over_encoder'])})",
                    f"{v['chain_vs_eager_fp32']:.2f} ({mark(v['met']['chain_vs_eager_fp32'])})",
                    f"{v['boxes8_separate_over_batched']:.2f} ({mark(v['met']['boxes8'])})")
    return {"chains": chains, "router": router, "targets": targets}


def render(result: dict[str, Any]) -> str:
    t = tables(result)
    lines = [f"# GPU suite ({result['device']}: {result['device_name']})", "",
             f"torch {result['torch']}, onnxruntime {result['onnxruntime']}; medians of {result['runs']} runs, ms; "
             "one 768×1024 image, one box, route forced to a task (alignment runs).", "",
             t["chains"].markdown(), "", t["router"].markdown(), "", t["targets"].markdown()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", "--sam", dest="models", default=None,
                        help="SAM variants, comma-separated (models/sam_loader.py SAM_SPECS), e.g. "
                             "vit_b,mobile_sam,efficientvit_sam_l0; default: tiny,vit_b on cuda, tiny on cpu")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmups", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument("--router-tasks", type=int, default=ROUTER_TASKS,
                        help="tasks of the router measured (0: the --bundle export's own router, nothing exported)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/casam_gpu_suite"), help="bundles and exports, kept for reruns")
    parser.add_argument("--bundle", type=Path, default=None, help="use this (tiny) bundle instead of making one")
    parser.add_argument("--engines", action="append", default=[], metavar="PRECISION=DIR",
                        help="use this export of --bundle for a precision instead of exporting (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/casam_gpu_suite/suite"),
                        help="writes OUT.json (the raw figures) and OUT.md; the record goes to --results-dir")
    add_results_option(parser)
    args = parser.parse_args(argv)
    run = start("gpu_suite", argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU (use --device cpu to check the plumbing)")
    models = (args.models or ("tiny,vit_b" if args.device == "cuda" else "tiny")).split(",")
    if args.device == "cpu" and not all(m in SAM_SPECS and SAM_SPECS[m].seeded for m in models):
        parser.error("--device cpu runs the tiny seeded variants only (tiny, tiny_mobile_sam, tiny_efficientvit)")
    precisions = ["fp32", "fp16"] if args.device == "cuda" else ["fp32"]
    engines = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in args.engines}
    clock = Clock(args.device, args.runs, args.warmups)
    args.work.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [measure_model(m, args.device, clock, args.work, precisions, args.bundle, engines) for m in models]
    result: dict[str, Any] = {"device": args.device, "device_name": device_name(args.device), "runs": args.runs,
                              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                              "models": results,
                              "router": router_many(args.device, clock, args.work, "ort-cuda" if args.device == "cuda"
                                                    else "ort-cpu", args.router_tasks,
                                                    Bundle.open(args.bundle) if args.bundle else None,
                                                    engines.get("fp32"))}
    result["targets"] = verdicts(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), render(result))
    write_record(run, tables(result), setup=f"{result['device']}: {result['device_name']}; torch {result['torch']}, "
                 f"onnxruntime {result['onnxruntime']}; medians of {result['runs']} runs, ms; one 768×1024 image, "
                 "one box, route forced to a task (alignment runs).", folder=args.results_dir)
    return result


if __name__ == "__main__":
    main()
