"""OpenVINO backend: the export's ONNX graphs compiled by OpenVINO's CPU plugin.

The same graph files as the onnxruntime backends, read by OpenVINO's ONNX frontend, so an
export needs nothing new to run here (the ``openvino`` extra brings the wheel; nothing of
it imports torch).

The inference precision is set explicitly. OpenVINO's CPU plugin otherwise lowers fp32
graphs to bf16 on CPUs with bf16 support (AVX512-BF16 or AMX: its default
``INFERENCE_PRECISION_HINT`` there is bf16), which would make the masks depend on which
CPU the site happens to have. Quantised (QDQ int8) graphs still run their int8 parts in
int8: the hint governs only the float parts.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np

from runtime.backends.base import Tensor, to_numpy
from runtime.backends.ort import BackendUnavailable
from casam_core.optional import optional_import
from casam_core.errors import ManifestError

#: casam precision name → OpenVINO's inference precision hint.
PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
DEFAULT_PRECISION = "f32"


def import_openvino() -> Any:
    return optional_import("openvino", "openvino", "the OpenVINO backend", BackendUnavailable)


def available() -> tuple[bool, str]:
    try:
        import_openvino()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, ""


class OpenVinoEngine:
    """One compiled model. ``run`` is thread-safe: each thread gets its own infer request
    (requests keep state between calls, compiled models are shared)."""

    def __init__(self, key: str, model: Any, compiled: Any) -> None:
        self.key = key
        self.compiled = compiled
        # Names from the graph as read: compiling may rename an output port after the node
        # that now produces it (the encoder's "embeddings" became "div_1"), while port order
        # is kept, so outputs are matched by position.
        self.input_names = [p.get_any_name() for p in model.inputs]
        self.output_names = [p.get_any_name() for p in model.outputs]
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, feeds: Mapping[str, Tensor], keep_on_device: Collection[str] = ()) -> dict[str, Tensor]:
        arrays = {k: np.ascontiguousarray(to_numpy(v), dtype=np.float32) for k, v in feeds.items()}
        # share_outputs=False copies the outputs out of the request's buffers, which the
        # next call on this thread overwrites.
        outputs = self._request().infer(arrays, share_inputs=True, share_outputs=False)
        return {name: np.asarray(outputs[port]) for name, port in zip(self.output_names, self.compiled.outputs)}


class OpenVinoBackend:
    """``openvino`` on the CPU, with an explicit inference precision (f32 by default)."""

    name = "openvino"
    device = "cpu"

    def __init__(self, precision: str = DEFAULT_PRECISION, threads: int = 0, hint: str = "LATENCY") -> None:
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"unknown OpenVINO precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.precision = precision
        # Dynamic quantisation (activations to int8 on the fly, for layers with compressed
        # weights) is off too: it is a precision change no manifest would record.
        self.config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": hint,
                                       "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads

    def load(self, key: str, path: Path) -> OpenVinoEngine:
        try:
            model = self.core.read_model(str(path))
            compiled = self.core.compile_model(model, "CPU", self.config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises plain RuntimeErrors for bad graphs
            raise ManifestError(f"OpenVINO cannot load {path} ({str(exc).strip().splitlines()[0]})") from exc
        return OpenVinoEngine(key, model, compiled)

    def to_numpy(self, value: Tensor) -> np.ndarray:
        return to_numpy(value)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "openvino": self.ov.__version__, "device": "CPU",
                "inference_precision": self.precision}
