"""What the runtime's onnxruntime CPU session settings buy, against onnxruntime's defaults.

The runtime (runtime/backends/ort.py) turns off, on the CPU only:
  1. memory reuse and memory patterns: the planner keeps one buffer per tensor size alive,
     so SAM's encoder, with its many tensor sizes, peaks far above its live set;
  2. the SkipLayerNormalization fusion: its CPU kernel is slower than the Add and
     LayerNormalization kernels it replaces.
Times come from sessions of both settings in one process, taking turns after a warm-up
(a shared machine's load moves more than the differences). Peak RSS (VmHWM) comes from a
fresh process per setting.

    .venv/bin/python bench/ort_options.py [--models tiny,vit_b] [--work DIR]

``--work`` shares bundles and exports with bench/infer_latency.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import Table, add_results_option, start, write_record  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.prompts import encode_prompts  # noqa: E402

SETTINGS = ("onnxruntime defaults", "casam runtime")


def session(path: Path, setting: str) -> Any:
    """An ORT CPU session with onnxruntime's defaults, or exactly as the runtime opens one."""
    import onnxruntime as ort

    from runtime.backends import OrtBackend
    from runtime.backends.ort import session_options

    if setting == "casam runtime":
        return OrtBackend("ort-cpu").session(path)
    # onnxruntime allows one kind of thread pool per process: both settings run on the
    # process-wide pool the runtime uses (bench/thread_pool.py measures that choice).
    return ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])


def feeds_for(kind: str) -> list[dict[str, np.ndarray]]:
    """The inputs of one timed unit: an encoder run, or eight boxes in one or eight decoder calls."""
    rng = np.random.default_rng(0)
    if kind == "encoder":
        return [{"image": rng.normal(size=(1, 3, 1024, 1024)).astype(np.float32)}]
    if kind == "skip+layernorm":
        return [{"x": rng.normal(size=(8, 4096, 256)).astype(np.float32),
                 "skip": rng.normal(size=(8, 4096, 256)).astype(np.float32)}]
    emb = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    boxes = np.array([[40 + 100 * i, 30 + 60 * i, 240 + 90 * i, 260 + 50 * i] for i in range(8)], np.float32)
    coords, labels = encode_prompts(boxes)
    slices = [slice(0, 8)] if kind == "decoder K=8" else [slice(i, i + 1) for i in range(8)]
    return [{"embeddings": emb, "point_coords": coords[s], "point_labels": labels[s]} for s in slices]


def timed(path: Path, kind: str, runs: int) -> dict[str, float]:
    """Median ms per setting, the two settings' sessions taking turns."""
    sessions = {s: session(path, s) for s in SETTINGS}
    feeds = feeds_for(kind)
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for i in range(runs + 1):
        for setting, sess in sessions.items():
            t0 = time.perf_counter()
            for f in feeds:
                sess.run(None, f)
            if i:  # the first round warms up
                times[setting].append((time.perf_counter() - t0) * 1000.0)
    return {s: statistics.median(t) for s, t in times.items()}


def residual_layernorm_graph(folder: Path) -> Path:
    """Add + LayerNormalization over 8×4096×256: the pattern onnxruntime fuses into SkipLayerNormalization."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = [8, 4096, 256]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "skip"], ["sum"]),
         helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)],
        "residual_layernorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("skip", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.ones(256, np.float32), "gamma"),
         numpy_helper.from_array(np.zeros(256, np.float32), "beta")],
    )
    path = folder / "residual_layernorm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def probe_rss(path: Path, kind: str, setting: str, runs: int) -> float:
    """In a fresh process: open one session, run it ``runs`` times, report VmHWM."""
    sess = session(path, setting)
    for _ in range(runs):
        for f in feeds_for(kind):
            sess.run(None, f)
    return peak_rss_mb()


def fresh_rss(path: Path, kind: str, setting: str, runs: int) -> float:
    cmd = [sys.executable, __file__, "--probe", str(path), kind, setting, str(runs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        print(json.dumps(probe_rss(Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--work", type=Path, default=None, help="bundles and exports (shared with infer_latency.py)")
    add_results_option(parser)
    args = parser.parse_args()
    run = start("ort_options")

    from infer_latency import exported

    work = args.work or Path(tempfile.mkdtemp(prefix="casam_ort_options_"))
    work.mkdir(parents=True, exist_ok=True)
    table = Table.of("graph", "run", ("ms, onnxruntime defaults", "{:.1f}"), ("ms, casam runtime", "{:.1f}"),
                     ("peak RSS MB, defaults", "{:.0f}"), ("peak RSS MB, casam runtime", "{:.0f}"))

    def row(label: str, what: str, path: Path, kind: str, runs: int, rss: bool) -> None:
        print(f"{label}: {what}…", flush=True)
        ms = timed(path, kind, runs)
        mb = {s: fresh_rss(path, kind, s, 2) if rss else None for s in SETTINGS}
        table.add(label, what, ms[SETTINGS[0]], ms[SETTINGS[1]], mb[SETTINGS[0]], mb[SETTINGS[1]])

    row("Add + LayerNormalization", "8×4096×256", residual_layernorm_graph(work), "skip+layernorm", 20, False)
    for name in args.models.split(","):
        graphs = Manifest.load(exported(name, work)[2]).graphs  # content-named files: ask the manifest
        row(f"{name} encoder", "1 image, 1024²", graphs["encoder"].path, "encoder", 3 if name == "vit_b" else 9, True)
        row(f"{name} decoder", "8 boxes, one call", graphs["decoder"].path, "decoder K=8", 9, True)
        row(f"{name} decoder", "8 boxes, 8 calls", graphs["decoder"].path, "decoder 8×K=1", 9, False)
    setup = ("onnxruntime CPU session settings, onnxruntime's defaults against the casam runtime's; fp32 graphs from "
             "casam-export, random weights. ms: median, the two settings' sessions taking turns in one process after "
             "a warm-up. Peak RSS: VmHWM of a fresh process that opens one session and runs it twice "
             "(onnxruntime's memory patterns allocate their block on the second run).")
    write_record(run, {"settings": table}, setup=setup, folder=args.results_dir)


if __name__ == "__main__":
    main()
