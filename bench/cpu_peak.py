"""Distance to the CPU's limit: encoder GMAC/s against this machine's measured GEMM peak.

Measured in one run, side by side (each figure takes turns with the others after a warm-up,
so they share the machine's background load):
  1. the CPU model and the flags that decide int8 and fp32 speed (AVX2, AVX-512, VNNI, AMX);
  2. the matrix-product peak through the same onnxruntime: a large fp32 MatMul and a
     uint8×int8 MatMulInteger (the kernel a QDQ int8 graph runs);
  3. each encoder export given (fp32 and int8), through onnxruntime and OpenVINO: median ms,
     GMAC/s (multiply-adds counted from the graph itself) and the fraction of the peak of
     its precision.

    .venv/bin/python bench/cpu_peak.py --engines tiny-fp32=DIR --engines tiny-int8=DIR2 [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from runtime.backends.ort import OrtBackend  # noqa: E402
from casam_core.files import atomic_write_text  # noqa: E402

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
GEMM_SIZE = 2048


def cpu_description() -> tuple[str, list[str]]:
    """(CPU model, which of FLAGS it has), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return model, [f for f in FLAGS if f in flags]


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


# ----- GEMM peak -------------------------------------------------------------------------
def gemm_graph(folder: Path, kind: str, n: int) -> Path:
    """One n×n×n matrix product as an ONNX graph: fp32 MatMul, or uint8×int8 MatMulInteger
    with the int8 weights as an initializer (as a quantised graph holds them)."""
    rng = np.random.default_rng(0)
    if kind == "fp32":
        weight = helper.make_tensor("B", TensorProto.FLOAT, (n, n), rng.normal(size=(n, n)).astype(np.float32).tobytes(), raw=True)
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, (n, n))]
        output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, (n, n))
    else:
        weight = helper.make_tensor("B", TensorProto.INT8, (n, n), rng.integers(-127, 128, (n, n), dtype=np.int8).tobytes(), raw=True)
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, (n, n))]
        output = helper.make_tensor_value_info("Y", TensorProto.INT32, (n, n))
    graph = helper.make_graph([node], f"gemm_{kind}", inputs, [output], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path = folder / f"gemm_{kind}.onnx"
    onnx.save_model(model, str(path))
    return path


def gemm_feed(kind: str, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    if kind == "fp32":
        return {"A": rng.normal(size=(n, n)).astype(np.float32)}
    return {"A": rng.integers(0, 256, (n, n), dtype=np.uint8)}


# ----- multiply-adds of a graph ----------------------------------------------------------
def graph_macs(path: Path, batch: int = 1) -> float:
    """Multiply-adds of one run of ``path`` with its dynamic batch set to ``batch``: the sum
    over MatMul, Gemm, Conv (and their integer forms) of output elements × reduction length,
    from ONNX shape inference. Elementwise ops are not counted (they are not GEMM work)."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0.0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if not out or 0 in out:
            continue
        if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
            a = shapes.get(node.input[0] if node.op_type != "QLinearMatMul" else node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = (a[-2] if trans_a else a[-1]) if a else 0
            total += float(np.prod(out)) * k
        elif node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[1] if node.op_type != "QLinearConv" else node.input[3])
            if w:
                total += float(np.prod(out)) * float(np.prod(w[1:]))
    return total


def encoder_file(given: Path) -> tuple[Path, str]:
    """(encoder graph, its precision) of an export folder (from its manifest) or of a bare
    encoder .onnx (int8 when it holds QDQ nodes)."""
    if given.is_dir():
        entry = json.loads((given / "manifest.json").read_text())["graphs"]["encoder"]
        return given / entry["file"], entry["precision"]
    nodes = onnx.load(str(given), load_external_data=False).graph.node
    return given, "int8" if any(n.op_type == "DequantizeLinear" for n in nodes) else "fp32"


# ----- measurement -----------------------------------------------------------------------
def take_turns(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median ms of each function; one warm-up each, then ``runs`` rounds in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def backends(names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if name == "ort":
            out[name] = OrtBackend("ort-cpu")
        elif name == "openvino":
            try:
                from runtime.backends.openvino import OpenVinoBackend

                out[name] = OpenVinoBackend()
            except Exception as exc:  # noqa: BLE001 - the wheel may be absent
                print(f"openvino: skipped ({exc})", flush=True)
    return out


def measure(engines: dict[str, Path], backend_names: list[str], runs: int, work: Path) -> dict[str, Any]:
    chosen = backends(backend_names)
    fns: dict[str, Callable[[], Any]] = {}
    for kind in ("fp32", "int8"):
        engine = OrtBackend("ort-cpu").load(f"gemm_{kind}", gemm_graph(work, kind, GEMM_SIZE))
        feed = gemm_feed(kind, GEMM_SIZE)
        fns[f"gemm {kind}"] = (lambda e=engine, f=feed: e.session.run(None, f))
    image = np.random.default_rng(2).normal(size=(1, 3, 1024, 1024)).astype(np.float32)
    macs: dict[str, float] = {}
    precision: dict[str, str] = {}
    for label, given in engines.items():
        path, precision[label] = encoder_file(given)
        macs[label] = graph_macs(path)
        for bname, backend in chosen.items():
            engine = backend.load("encoder", path)
            fns[f"{label} encoder {bname}"] = (lambda e=engine: e.run({"image": image}))
    print(f"measuring {len(fns)} figures, {runs} turns…", flush=True)
    return {"ms": take_turns(fns, runs), "macs": macs, "precision": precision, "gemm_macs": float(GEMM_SIZE) ** 3}


def render(result: dict[str, Any], runs: int) -> str:
    model, flags = cpu_description()
    ms, macs = result["ms"], result["macs"]
    peak = {kind: result["gemm_macs"] / ms[f"gemm {kind}"] / 1e6 for kind in ("fp32", "int8")}  # GMAC/s
    import onnxruntime

    lines = ["# Distance to the CPU's peak: encoder GMAC/s against the measured GEMM peak", "",
             f"CPU: {model}, {os.cpu_count()} cores; flags: {', '.join(flags) or 'none of ' + ', '.join(FLAGS)}. "
             f"Load average {load_average()} when written (shared machine: compare ratios, measured side by "
             f"side in turns). onnxruntime {onnxruntime.__version__}; medians of {runs} turns.", "",
             "An encoder is held against the peak of the precision its manifest records (an int8 "
             "export whose encoder missed its bar keeps it in fp32).", "",
             "| figure | median ms | GMAC | GMAC/s | fraction of peak |", "|---|---|---|---|---|"]
    for kind in ("fp32", "int8"):
        lines.append(f"| GEMM {GEMM_SIZE}³ {kind} (onnxruntime{', u8×s8 MatMulInteger' if kind == 'int8' else ''}) "
                     f"| {ms[f'gemm {kind}']:.1f} | {result['gemm_macs'] / 1e9:.1f} | {peak[kind]:.1f} | 1.00 (peak) |")
    for name, value in ms.items():
        if name.startswith("gemm"):
            continue
        label = name.split(" encoder ")[0]
        kind = "int8" if result["precision"][label] == "int8" else "fp32"
        gmacs = macs[label] / value / 1e6
        against = f"{gmacs / peak[kind]:.2f} of {kind} peak" + (f", {gmacs / peak['fp32']:.2f} of fp32 peak" if kind != "fp32" else "")
        lines.append(f"| {name} | {value:.1f} | {macs[label] / 1e9:.1f} | {gmacs:.1f} | {against} |")
    pairs = [(a, b) for a in ms for b in ms if a.endswith("ort") and b == a[: -len("ort")] + "openvino"]
    if pairs:
        lines += ["", "| encoder | onnxruntime / OpenVINO time |", "|---|---|"]
        lines += [f"| {a[: -len(' encoder ort')]} | {ms[a] / ms[b]:.2f}× |" for a, b in pairs]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", action="append", default=[], metavar="LABEL=DIR",
                        help="an export folder (or a bare encoder .onnx) to time the encoder of, held "
                             "against the peak of its precision (repeatable)")
    parser.add_argument("--backends", default="ort,openvino")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_peak.md")
    args = parser.parse_args(argv)
    engines = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in args.engines}
    with tempfile.TemporaryDirectory(prefix="casam_peak_") as tmp:
        result = measure(engines, args.backends.split(","), args.runs, Path(tmp))
    text = render(result, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
