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
from typing import Any, Mapping, Optional

from casam_export.errors import ExportError
from runtime.backends.ort import BackendUnavailable
from runtime.backends.tensorrt import build_engine as runtime_build_engine
from runtime.backends.tensorrt import engine_file_name, gpu_name, import_tensorrt
from casam_core.errors import ManifestError
from casam_core.files import atomic_write_bytes, sha256_bytes, sha256_file
from runtime.manifest import graph_content_id


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


def build_engine(onnx_path: Path, fp16: bool, max_prompts: int) -> bytes:
    """The runtime's single TensorRT builder, with its errors reported as export errors."""
    try:
        return runtime_build_engine(onnx_path, fp16, max_prompts)
    except (ManifestError, BackendUnavailable) as exc:
        raise ExportError(str(exc)) from exc


def build_engines(
    out: Path,
    graphs: Mapping[str, Mapping[str, Any]],
    fp16: bool,
    max_prompts: int,
) -> dict[str, Any]:
    """Build (or reuse from ``out/trt``) one engine per graph; the manifest's ``tensorrt`` table."""
    trt = import_tensorrt()
    gpu = gpu_name()
    engines = {}
    for key, entry in graphs.items():
        onnx_sha = entry["sha256"]
        content_id = graph_content_id(onnx_sha, (entry.get("external_data") or {}).get("sha256"))
        rel = f"trt/{engine_file_name(key, content_id, gpu, trt.__version__)}"
        path = out / rel
        if path.is_file():
            sha = sha256_file(path)
        else:
            engine = build_engine(out / entry["file"], fp16, max_prompts)
            atomic_write_bytes(path, engine)
            sha = sha256_bytes(engine)
        engines[key] = {"file": rel, "sha256": sha, "onnx_sha256": onnx_sha,
                        "gpu": gpu, "tensorrt_version": trt.__version__}
    return {"available": True, "reason": None, "engines": engines}
