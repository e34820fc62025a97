"""Choosing an inference backend for an export folder.

``BACKEND_TABLE`` is the one list of backends: the CLIs derive their ``--backend`` choices
and help from it, and ``open_backend`` dispatches through it.
"""

from __future__ import annotations

from typing import Callable

from runtime.backends.base import Backend, Engine, Tensor
from runtime.backends.ort import BackendUnavailable, OrtBackend, cuda_usable
from casam_core.errors import CasamError
from runtime.manifest import Manifest

#: CPU backends in the order ``auto`` tries them, per export precision (the manifest's
#: "precision"). Decided by measurement on the CI-class Intel Xeon (AVX-512 VNNI, AMX;
#: encoders side by side in bench/cpu_peak.py, BENCHMARKS.md "Distance to the peak"):
#: onnxruntime ran the tiny encoder faster than OpenVINO, and the vit_b encoder about as
#: fast (a tie at this machine's noise), so onnxruntime, the runtime the export verifies
#: against, is kept and ``openvino`` is chosen only by name. A precision whose measurement
#: favours OpenVINO lists it first here.
CPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "fp32": ("ort-cpu",),
    "fp16": ("ort-cpu",),
    "int8": ("ort-cpu",),
}


def _ort_cpu(manifest: Manifest) -> Backend:
    return OrtBackend("ort-cpu")


def _ort_cuda(manifest: Manifest) -> Backend:
    cuda_usable(manifest.graphs["router"].path) or _refuse("ort-cuda", "onnxruntime finds no usable CUDA GPU")
    return OrtBackend("ort-cuda")


def _trt(manifest: Manifest) -> Backend:
    from runtime.backends.tensorrt import TrtBackend

    return TrtBackend(manifest.tensorrt_engines(), manifest.folder, fp16=manifest.data.get("precision") == "fp16",
                      max_prompts=manifest.max_prompts,
                      content_ids={g.key: g.content_id for g in manifest.all_graphs()})


def _openvino(manifest: Manifest) -> Backend:
    from runtime.backends.openvino import OpenVinoBackend

    return OpenVinoBackend()


def _auto(manifest: Manifest) -> Backend:
    """The fastest backend that really works here.

    TensorRT only when the manifest holds engines built for this very GPU (building them
    can take minutes, which ``trt`` does on purpose), then ORT on CUDA when a CUDA session
    really gets the GPU, then the CPU backends in ``CPU_PREFERENCE`` order.
    """
    try:
        trt = _trt(manifest)
        if all(trt.matching_prebuilt(g.key) is not None for g in manifest.all_graphs()):
            return trt
    except BackendUnavailable:
        pass
    if cuda_usable(manifest.graphs["router"].path):
        return OrtBackend("ort-cuda")
    for name in CPU_PREFERENCE.get(str(manifest.data.get("precision")), ("ort-cpu",)):
        try:
            return BACKEND_TABLE[name][0](manifest)
        except BackendUnavailable:
            continue
    return OrtBackend("ort-cpu")


#: name → (opener, one line of help). The CLIs' --backend choices come from here.
BACKEND_TABLE: dict[str, tuple[Callable[[Manifest], Backend], str]] = {
    "auto": (_auto, "TensorRT engines built for this GPU, else ORT CUDA if usable, else the faster CPU backend "
                    "for the export's precision"),
    "ort-cpu": (_ort_cpu, "onnxruntime on the CPU"),
    "ort-cuda": (_ort_cuda, "onnxruntime on a CUDA GPU, embeddings kept on the device"),
    "trt": (_trt, "TensorRT engines (built on first use when the export has none for this GPU)"),
    "openvino": (_openvino, "OpenVINO on the CPU, fp32 inference precision (the openvino extra)"),
}
BACKENDS = tuple(BACKEND_TABLE)


def backends_help() -> str:
    """``--backend`` help text for the CLIs, from the table."""
    return "; ".join(f"{name}: {text}" for name, (_, text) in BACKEND_TABLE.items()) + "."


def open_backend(name: str, manifest: Manifest) -> Backend:
    """The backend called ``name`` (one of ``BACKENDS``)."""
    if name not in BACKEND_TABLE:
        raise CasamError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return BACKEND_TABLE[name][0](manifest)


def _refuse(name: str, why: str) -> None:
    raise BackendUnavailable(f"backend {name} is not available: {why}")


__all__ = ["BACKENDS", "BACKEND_TABLE", "Backend", "BackendUnavailable", "Engine", "OrtBackend", "Tensor",
           "backends_help", "open_backend"]
