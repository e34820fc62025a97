"""TensorRT engines from the exported ONNX graphs, where TensorRT and a CUDA GPU exist.

A serialized engine runs only on the GPU model and TensorRT version that built it, so
engines are cached under names keyed by the ONNX sha, the GPU name and the TensorRT
version (``runtime.backends.tensorrt.engine_file_name``), and the manifest records all
three. Where TensorRT is absent the export writes ONNX only and says why; it never writes
a placeholder engine. Torch-free, so an edge device can build its own engines with it.

Written against TensorRT's documented Python API (Builder, OnnxParser, BuilderConfig,
optimisation profiles, ``build_serialized_network``); it cannot run on machines without
TensorRT, and its tests skip there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from casam_export.errors import ExportError
from runtime.backends.ort import BackendUnavailable
from runtime.backends.tensorrt import engine_file_name, gpu_name, import_tensorrt
from runtime.files import atomic_write_bytes, sha256_file

#: Upper bound of the batch dimension (encoder, router, align) in the optimisation profile.
MAX_BATCH = 8
#: Upper bound of the points-per-prompt dimension of the decoder.
MAX_POINTS = 16
WORKSPACE_BYTES = 4 << 30


def tensorrt_status(requested: Optional[bool]) -> tuple[bool, str]:
    """(build engines?, reason when not). ``None`` means "when TensorRT and a GPU exist"."""
    if requested is False:
        return False, "disabled with --no-trt"
    try:
        import_tensorrt()
        gpu_name()
    except BackendUnavailable as exc:
        if requested:
            raise ExportError(f"--trt was given but TensorRT cannot build here: {exc}") from exc
        return False, str(exc)
    return True, ""


def _fp32_layer(trt: Any, layer: Any) -> bool:
    """LayerNorm (fused or SAM's hand-expanded form), softmax and reductions stay fp32."""
    kinds = {trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        kinds.add(trt.LayerType.NORMALIZATION)
    if layer.type in kinds:
        return True
    if layer.type == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        return layer.op in (trt.ElementWiseOperation.POW, trt.ElementWiseOperation.DIV)
    if layer.type == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer
        return layer.op == trt.UnaryOperation.SQRT
    return False


def build_engine(onnx_path: Path, fp16: bool, max_prompts: int) -> bytes:
    """ONNX → serialized engine with one optimisation profile over batch, K and P."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT ≥ 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if _fp32_layer(trt, layer):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    maxima = {"point_coords": (max_prompts, MAX_POINTS), "point_labels": (max_prompts, MAX_POINTS)}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        bounds = maxima.get(tensor.name, (MAX_BATCH,))
        dynamic = [j for j, d in enumerate(shape) if d < 0]
        lo = tuple(1 if d < 0 else d for d in shape)
        hi = list(shape)
        for n, j in enumerate(dynamic):
            hi[j] = bounds[min(n, len(bounds) - 1)]
        profile.set_shape(tensor.name, lo, lo, tuple(hi))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name}")
    return bytes(serialized)


def build_engines(
    out: Path,
    graphs: Mapping[str, Mapping[str, Any]],
    fp16: bool,
    max_prompts: int,
    progress: Callable[[str], None] = lambda key: None,
) -> dict[str, Any]:
    """Build (or reuse from ``out/trt``) one engine per graph; the manifest's ``tensorrt`` table."""
    trt = import_tensorrt()
    gpu = gpu_name()
    engines = {}
    for key, entry in graphs.items():
        progress(key)
        onnx_sha = entry["sha256"]
        rel = f"trt/{engine_file_name(key, onnx_sha, gpu, trt.__version__)}"
        path = out / rel
        if not path.is_file():
            atomic_write_bytes(path, build_engine(out / entry["file"], fp16, max_prompts))
        engines[key] = {"file": rel, "sha256": sha256_file(path), "onnx_sha256": onnx_sha,
                        "gpu": gpu, "tensorrt_version": trt.__version__}
    return {"available": True, "reason": None, "engines": engines}
