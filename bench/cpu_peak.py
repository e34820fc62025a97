"""One definition of the CPU's peak, and each encoder's distance to it.

Measured in one run, side by side (each figure takes turns with the others after a warm-up,
so they share the machine's background load):
  1. the theoretical fp32 FMA peak: logical cores × clock × FMA units per core × fp32 lanes
     per vector (16 with AVX-512, 8 with AVX2), from /proc/cpuinfo; the FMA units per core
     and the clock are assumptions a VM does not report (``--fma-units``, ``--ghz``), and a
     turbo clock above the reported one shows as a measured rate above this peak;
  2. the best sustained fp32 rate of a 2048³ GEMM and of a 3×3 256→256 convolution on a
     64×64 map (the alignment layer's shape), each in onnxruntime (the runtime's session
     settings) and in torch; the best of the four is "the measured fp32 peak";
  3. the int8 GEMM rate in onnxruntime (uint8×int8 MatMulInteger, the kernel a QDQ graph runs);
  4. each encoder export given (fp32 and int8), through onnxruntime and OpenVINO: median ms,
     GMAC/s (multiply-adds counted from the graph) and the fraction of each named peak.

    .venv/bin/python bench/cpu_peak.py [--engines tiny-fp32=DIR --engines tiny-int8=DIR2] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
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

from common import Table, add_results_option, cpu, start, write_record  # noqa: E402
from runtime.backends.ort import OrtBackend  # noqa: E402

GEMM_SIZE = 2048
CONV = (256, 64)  # channels in = out, map side: the alignment layer's 3×3 convolutions


def theoretical_peak(fma_units: int, ghz: Optional[float]) -> tuple[float, str]:
    """(fp32 GMAC/s, how it was computed): cores × GHz × FMA units × fp32 lanes."""
    info = cpu()
    lanes = 16 if "avx512f" in info["flags"] else 8 if "avx2" in info["flags"] else 4
    clock = ghz if ghz else (info["mhz"] or 0.0) / 1000.0
    peak = info["cores"] * clock * fma_units * lanes
    return peak, (f"{info['cores']} logical cores × {clock:.2f} GHz × {fma_units} FMA units × {lanes} fp32 lanes "
                  f"({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'})")


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


def conv_graph(folder: Path) -> Path:
    """One 3×3 convolution, CONV channels in and out, padding 1, bias: the alignment
    layer's convolution as an ONNX graph."""
    channels, _ = CONV
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.FLOAT, (channels, channels, 3, 3),
                                rng.normal(size=(channels, channels, 3, 3)).astype(np.float32).tobytes(), raw=True)
    bias = helper.make_tensor("b", TensorProto.FLOAT, (channels,), np.zeros(channels, np.float32).tobytes(), raw=True)
    node = helper.make_node("Conv", ["X", "W", "b"], ["Y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    shape = (1, channels, CONV[1], CONV[1])
    graph = helper.make_graph([node], "conv3x3", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)], [weight, bias])
    path = folder / "conv3x3.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


def conv_macs() -> float:
    channels, side = CONV
    return float(side * side * channels * channels * 9)


def torch_figures() -> dict[str, Callable[[], Any]]:
    """The same GEMM and convolution in torch (its default threads), fp32."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen) for _ in range(2))
    conv = torch.nn.Conv2d(CONV[0], CONV[0], 3, padding=1).eval()
    x = torch.randn(1, CONV[0], CONV[1], CONV[1], generator=gen)

    def run_conv() -> Any:
        with torch.inference_mode():
            return conv(x)

    return {"gemm fp32 torch": lambda: torch.mm(a, b), "conv fp32 torch": run_conv}


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
    ort = OrtBackend("ort-cpu")
    fns: dict[str, Callable[[], Any]] = {}
    for kind in ("fp32", "int8"):
        engine = ort.load(f"gemm_{kind}", gemm_graph(work, kind, GEMM_SIZE))
        fns[f"gemm {kind} onnxruntime"] = (lambda e=engine, f=gemm_feed(kind, GEMM_SIZE): e.session.run(None, f))
    conv = ort.load("conv3x3", conv_graph(work))
    feed = {"X": np.random.default_rng(3).normal(size=(1, CONV[0], CONV[1], CONV[1])).astype(np.float32)}
    fns["conv fp32 onnxruntime"] = lambda: conv.session.run(None, feed)
    fns.update(torch_figures())
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
    return {"ms": take_turns(fns, runs), "macs": macs, "precision": precision}


def peak_table(ms: dict[str, float], theoretical: float) -> tuple[Table, dict[str, float]]:
    """The peaks: each kernel's GMAC/s and its fraction of the theoretical FMA peak."""
    table = Table.of("figure", "engine", ("median ms", "{:.1f}"), ("GMAC", "{:.2f}"), ("GMAC/s", "{:.1f}"),
                     ("of theoretical fp32 FMA peak", "{:.2f}"))
    table.add("theoretical fp32 FMA peak", None, None, None, theoretical, 1.0)
    rates: dict[str, float] = {}
    for key, what, macs in (("gemm fp32", f"GEMM {GEMM_SIZE}³ fp32", float(GEMM_SIZE) ** 3),
                            ("conv fp32", f"conv 3×3 {CONV[0]}→{CONV[0]}, {CONV[1]}×{CONV[1]}, fp32", conv_macs()),
                            ("gemm int8", f"GEMM {GEMM_SIZE}³ int8 (u8×s8 MatMulInteger)", float(GEMM_SIZE) ** 3)):
        for engine in ("onnxruntime", "torch"):
            name = f"{key} {engine}"
            if name in ms:
                rates[name] = macs / ms[name] / 1e6
                table.add(what, engine, ms[name], macs / 1e9, rates[name],
                          rates[name] / theoretical if "fp32" in key and theoretical else None)
    return table, rates


def encoder_table(result: dict[str, Any], rates: dict[str, float], theoretical: float) -> Table:
    """Each encoder's GMAC/s against the peaks, each column naming its peak."""
    best = max(v for k, v in rates.items() if "fp32" in k)
    table = Table.of("encoder", "backend", "precision", ("median ms", "{:.1f}"), ("GMAC", "{:.1f}"),
                     ("GMAC/s", "{:.1f}"), ("of measured fp32 peak", "{:.2f}"),
                     ("of theoretical fp32 FMA peak", "{:.2f}"), ("of onnxruntime int8 GEMM", "{:.2f}"))
    for name, value in result["ms"].items():
        if " encoder " not in name:
            continue
        label, backend = name.split(" encoder ")
        gmacs = result["macs"][label] / value / 1e6
        int8 = gmacs / rates["gemm int8 onnxruntime"] if result["precision"][label] == "int8" else None
        table.add(label, backend, result["precision"][label], value, result["macs"][label] / 1e9, gmacs, gmacs / best,
                  gmacs / theoretical if theoretical else None, int8)
    return table


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", action="append", default=[], metavar="LABEL=DIR",
                        help="an export folder (or a bare encoder .onnx) to time the encoder of (repeatable)")
    parser.add_argument("--backends", default="ort,openvino")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core (2 on Xeon and Zen 3+ cores)")
    parser.add_argument("--ghz", type=float, default=None, help="clock for the theoretical peak (default: /proc/cpuinfo)")
    add_results_option(parser)
    args = parser.parse_args(argv)
    run = start("cpu_peak", argv)
    engines = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in args.engines}
    theoretical, how = theoretical_peak(args.fma_units, args.ghz)
    with tempfile.TemporaryDirectory(prefix="casam_peak_") as tmp:
        result = measure(engines, args.backends.split(","), args.runs, Path(tmp))
    peaks, rates = peak_table(result["ms"], theoretical)
    tables = {"peaks": peaks}
    if engines:
        tables["encoders"] = encoder_table(result, rates, theoretical)
        pairs = [(a, b) for a in result["ms"] for b in result["ms"]
                 if a.endswith(" encoder ort") and b == a[: -len("ort")] + "openvino"]
        if pairs:
            tables["ort_vs_openvino"] = Table.of("encoder", ("onnxruntime / OpenVINO time", "{:.2f}×"))
            for a, b in pairs:
                tables["ort_vs_openvino"].add(a[: -len(" encoder ort")], result["ms"][a] / result["ms"][b])
    best = max((k for k in rates if "fp32" in k), key=rates.get)
    setup = (f"Medians of {args.runs} turns, every figure taking turns with the others after a warm-up. "
             f"Theoretical fp32 FMA peak: {how}. The measured fp32 peak is the best of the four fp32 rates "
             f"(here {best}).")
    write_record(run, tables, setup=setup, folder=args.results_dir)


if __name__ == "__main__":
    main()
