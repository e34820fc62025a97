"""Backend choice: ORT CPU here; ORT CUDA and TensorRT where a GPU exists, else clean refusals."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from runtime.backends import BackendUnavailable, open_backend
from runtime.backends.ort import cuda_usable
from runtime.backends.tensorrt import available as trt_available
from runtime.backends.tensorrt import engine_file_name
from casam_core.errors import CasamError
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
from runtime_support import BOXES, sample_images


def gpu_results(engines, backend: str) -> None:
    """The accelerated chain against ORT CPU on the same inputs."""
    cpu = Pipeline.from_manifest(engines, backend="ort-cpu")
    gpu = Pipeline.from_manifest(engines, backend=backend)
    for image in sample_images()[:2]:
        for task in (None, "beta", "identity"):
            a, b = cpu.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task=task), gpu.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task=task)
            assert a.route == b.route
            inter = np.logical_and(a.masks, b.masks).sum()
            assert inter / max(np.logical_or(a.masks, b.masks).sum(), 1) >= 0.99


def test_auto_falls_back_to_what_really_works(engines):
    backend = open_backend("auto", Manifest.load(engines))
    if trt_available()[0]:
        assert backend.name in ("trt", "ort-cuda")
    else:
        assert backend.name == ("ort-cuda" if cuda_usable(Manifest.load(engines).graphs["router"].path) else "ort-cpu")
    with pytest.raises(CasamError, match="unknown backend"):
        open_backend("metal", Manifest.load(engines))


def test_ort_cuda_keeps_embeddings_on_device_or_refuses(engines):
    manifest = Manifest.load(engines)
    if not cuda_usable(manifest.graphs["router"].path):
        with pytest.raises(BackendUnavailable, match="no usable CUDA GPU"):
            open_backend("ort-cuda", manifest)
        return
    backend = open_backend("ort-cuda", manifest)
    assert backend.io_binding
    gpu_results(engines, "ort-cuda")


def test_tensorrt_runs_or_refuses_cleanly(engines):
    ok, reason = trt_available()
    if not ok:
        with pytest.raises(BackendUnavailable) as info:
            Pipeline.from_manifest(engines, backend="trt")
        assert str(info.value) == reason and "\n" not in reason
        if importlib.util.find_spec("tensorrt") is None:
            assert "needs tensorrt, which is not installed" in reason
        return
    gpu_results(engines, "trt")


def test_engine_file_names_follow_the_format():
    name = engine_file_name("align/polyp", "ab" * 32, "NVIDIA H200 NVL", "10.3.0")
    assert name == "align_polyp-abababababab-NVIDIA_H200_NVL-trt10.3.0.engine"


def test_engine_names_change_with_external_weights():
    """A graph whose weights live in a .data file gets a new engine name when only the weights change."""
    from runtime.manifest import graph_content_id

    onnx_sha = "cd" * 32
    assert graph_content_id(onnx_sha) == graph_content_id(onnx_sha, None) == onnx_sha
    one, other = graph_content_id(onnx_sha, "01" * 32), graph_content_id(onnx_sha, "02" * 32)
    assert len({one, other, onnx_sha}) == 3
    assert engine_file_name("encoder", one, "gpu", "10") != engine_file_name("encoder", other, "gpu", "10")


def test_cpu_sessions_allocate_per_tensor_not_per_size(engines):
    """onnxruntime's size-keyed buffer reuse and memory patterns stay off on the CPU: with
    them the vit_b encoder held far more buffers than its live set (BENCHMARKS.md,
    "bench/ort_options.py")."""
    from runtime.backends.ort import OrtBackend

    options = OrtBackend("ort-cpu").session(Manifest.load(engines, verify=False).graphs["encoder"].path).get_session_options()
    assert options.enable_mem_reuse is False and options.enable_mem_pattern is False
    assert options.enable_cpu_mem_arena is True  # freed tensors go back to the arena, not the OS


def test_cpu_sessions_share_one_arena(engines):
    """Every CPU session allocates from one process-wide arena, so the chain's memory is the
    largest graph's peak, not the sum of each graph's (vit_b int8: 507 against 558 MB,
    runtime/backends/ort.py); opening another backend does not register a second one."""
    from runtime.backends.ort import OrtBackend

    graphs = Manifest.load(engines, verify=False).graphs
    for key in ("encoder", "decoder"):
        options = OrtBackend("ort-cpu").session(graphs[key].path).get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
