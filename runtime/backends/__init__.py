"""Choosing an inference backend for an export folder: ``auto``, ``ort-cpu``, ``ort-cuda``, ``trt``."""

from __future__ import annotations

from runtime.backends.base import Backend, Engine, Tensor
from runtime.backends.ort import BackendUnavailable, OrtBackend, cuda_usable
from runtime.errors import CasamError
from runtime.manifest import Manifest

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")


def open_backend(name: str, manifest: Manifest) -> Backend:
    """The backend called ``name``; ``auto`` takes the fastest one that really works here.

    ``auto`` picks TensorRT only when the manifest holds engines built for this very GPU
    (building them can take minutes, which ``trt`` does on purpose), then ORT on CUDA when a
    CUDA session really gets the GPU, then ORT on the CPU.
    """
    if name not in BACKENDS:
        raise CasamError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "ort-cpu":
        return OrtBackend("ort-cpu")
    if name == "ort-cuda":
        cuda_usable(manifest.graphs["router"].path) or _refuse("ort-cuda", "onnxruntime finds no usable CUDA GPU")
        return OrtBackend("ort-cuda")
    if name == "trt":
        return _trt(manifest)
    try:
        trt = _trt(manifest)
        if all(trt.matching_prebuilt(g.key) is not None for g in manifest.all_graphs()):
            return trt
    except BackendUnavailable:
        pass
    if cuda_usable(manifest.graphs["router"].path):
        return OrtBackend("ort-cuda")
    return OrtBackend("ort-cpu")


def _trt(manifest: Manifest) -> Backend:
    from runtime.backends.tensorrt import TrtBackend

    return TrtBackend(manifest.tensorrt_engines(), manifest.folder, fp16=manifest.data.get("precision") == "fp16",
                      max_prompts=manifest.max_prompts,
                      content_ids={g.key: g.content_id for g in manifest.all_graphs()})


def _refuse(name: str, why: str) -> None:
    raise BackendUnavailable(f"backend {name} is not available: {why}")


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "Engine", "OrtBackend", "Tensor", "open_backend"]
