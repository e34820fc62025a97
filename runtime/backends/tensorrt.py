"""TensorRT backend: the manifest's prebuilt engines, or engines built on first use.

Device memory comes from onnxruntime-gpu's ``OrtValue`` (already installed for the CUDA
path), so this backend needs no extra CUDA binding package and its device tensors are
interchangeable with the ORT CUDA backend's. Execution contexts are not thread-safe, so
each engine serialises its own calls. Written against TensorRT ≥ 10's Python API
(``execute_async_v3``, named I/O tensors); where TensorRT is absent, ``available()`` says
so and the pipeline falls back or refuses with one clear line.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path
from typing import Any, Collection, Mapping, Optional

import numpy as np

from runtime.backends.base import Tensor, to_numpy
from runtime.backends.ort import BackendUnavailable, _ort
from casam_core.optional import optional_import
from casam_core.errors import ManifestError
from casam_core.files import atomic_write_bytes, sha256_file

#: Upper bound of the batch dimension (encoder, router, align) in the optimisation profile.
MAX_BATCH = 8
#: Upper bound of the points-per-prompt dimension of the decoder.
MAX_POINTS = 16
WORKSPACE_BYTES = 4 << 30


def import_tensorrt() -> Any:
    return optional_import("tensorrt", "trt", "the TensorRT backend", BackendUnavailable)


def available() -> tuple[bool, str]:
    try:
        import_tensorrt()
        gpu_name()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, ""


def _libcuda() -> Any:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendUnavailable("no CUDA driver found (libcuda)")


def gpu_name(device_id: int = 0) -> str:
    """The GPU's marketing name, through the CUDA driver API (part of every driver install)."""
    cuda = _libcuda()
    if cuda.cuInit(0) != 0:
        raise BackendUnavailable("the CUDA driver found no usable GPU")
    dev = ctypes.c_int()
    buf = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGet(ctypes.byref(dev), device_id) != 0 or cuda.cuDeviceGetName(buf, 256, dev) != 0:
        raise BackendUnavailable(f"CUDA device {device_id} is not available")
    return buf.value.decode()


def engine_file_name(key: str, content_id: str, gpu: str, trt_version: str) -> str:
    """``<graph>-<content id[:12]>-<gpu>-trt<version>.engine`` (docs/FORMATS.md); the
    content id is ``runtime.manifest.graph_content_id`` (the .onnx sha256 unless its
    weights are external)."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")  # noqa: E731
    return f"{safe(key.replace('/', '_'))}-{content_id[:12]}-{safe(gpu)}-trt{trt_version}.engine"


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
    """ONNX → serialized engine with one optimisation profile over batch, K and P.

    The single TensorRT builder: the runtime builds missing engines with it on first use,
    and it is torch-free so that casam-export can use the same one.
    """
    trt = import_tensorrt()
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise BackendUnavailable("this TensorRT install has no builder (lean runtime); export with casam-export --trt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT ≥ 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ManifestError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
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
    maxima = {"point_coords": (max_prompts, MAX_POINTS), "point_labels": (max_prompts, MAX_POINTS),
              "mask_input": (max_prompts,)}  # decoder_mask: K previous masks
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
        raise ManifestError(f"TensorRT failed to build an engine from {onnx_path.name}")
    return bytes(serialized)


class TrtEngine:
    def __init__(self, key: str, engine: Any, trt: Any, device_id: int) -> None:
        self.key = key
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device_id = device_id
        self.lock = threading.Lock()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = lambda n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.input_names = [n for n in names if is_input(n)]
        self.output_names = [n for n in names if not is_input(n)]

    def run(self, feeds: Mapping[str, Tensor], keep_on_device: Collection[str] = ()) -> dict[str, Tensor]:
        ort = _ort()
        device_inputs = {
            name: value if isinstance(value, ort.OrtValue)
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, dtype=np.float32), "cuda", self.device_id)
            for name, value in feeds.items()
        }
        with self.lock:
            for name, value in device_inputs.items():
                self.context.set_input_shape(name, tuple(value.shape()))
                self.context.set_tensor_address(name, value.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", self.device_id)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(0):
                raise ManifestError(f"TensorRT failed to run the {self.key} engine")
            synchronize()
        return {n: v if n in keep_on_device else v.numpy() for n, v in outputs.items()}


def synchronize() -> None:
    """Wait for the legacy default stream, where the engines are enqueued."""
    if _libcuda().cuCtxSynchronize() != 0:
        raise ManifestError("CUDA reported an error while running a TensorRT engine")


class TrtBackend:
    name = "trt"
    device = "cuda"

    def __init__(self, engines: Mapping[str, Mapping[str, Any]], folder: Path, device_id: int = 0,
                 fp16: bool = False, max_prompts: int = 16, cache_dir: Optional[Path] = None,
                 content_ids: Optional[Mapping[str, str]] = None) -> None:
        self.trt = import_tensorrt()
        self.gpu = gpu_name(device_id)
        self.device_id = device_id
        self.prebuilt = dict(engines)
        self.folder = folder
        self.content_ids = dict(content_ids or {})  # graph key → graph_content_id, from the manifest
        self.fp16 = fp16
        self.max_prompts = max_prompts
        self.cache_dir = cache_dir or _cache_dir(folder)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.build_lock = threading.Lock()
        self._verified: dict[str, Path] = {}  # prebuilt engines whose sha256 was checked once

    def matching_prebuilt(self, key: str) -> Optional[Path]:
        """The manifest's engine for ``key`` when built for this GPU and TensorRT, sha256-checked.

        The check runs once per engine: ``auto`` asks before loading, and the alignment
        engine cache reloads evicted engines, neither of which should re-hash the file.
        """
        if key in self._verified:
            return self._verified[key]
        entry = self.prebuilt.get(key)
        if not entry or entry.get("gpu") != self.gpu or entry.get("tensorrt_version") != self.trt.__version__:
            return None
        path = self.folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise ManifestError(f"TensorRT engine {path} for {key} is missing or does not match its sha256")
        self._verified[key] = path
        return path

    def load(self, key: str, path: Path) -> TrtEngine:
        engine_path = self.matching_prebuilt(key)
        if engine_path is None:
            with self.build_lock:
                content_id = self.content_ids.get(key) or sha256_file(path)
                engine_path = self.cache_dir / engine_file_name(key, content_id, self.gpu, self.trt.__version__)
                if not engine_path.is_file():
                    atomic_write_bytes(engine_path, build_engine(path, self.fp16, self.max_prompts))
        engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise ManifestError(f"TensorRT cannot deserialize {engine_path} (built by another TensorRT or GPU?)")
        return TrtEngine(key, engine, self.trt, self.device_id)

    def to_numpy(self, value: Tensor) -> np.ndarray:
        return to_numpy(value)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt": self.trt.__version__, "gpu": self.gpu, "cache": str(self.cache_dir)}


def _cache_dir(folder: Path) -> Path:
    """The export folder's trt/ when writable, else a per-user cache."""
    own = folder / "trt"
    if os.access(folder, os.W_OK) and (not own.exists() or os.access(own, os.W_OK)):
        return own
    return Path(os.environ.get("CASAM_CACHE", Path.home() / ".cache" / "casam")) / "trt"
