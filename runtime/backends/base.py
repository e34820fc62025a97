"""What the pipeline needs from an inference backend, and nothing more.

A backend turns a graph file into an ``Engine`` and moves tensors between host and
device. Tensors in flight are opaque handles (numpy arrays on the CPU, device buffers on a
GPU), so an accelerated backend can keep the image embedding on the device from the
encoder through alignment to the decoder, copying only scores and masks back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping, Protocol

import numpy as np

Tensor = Any  # np.ndarray on the host, or a backend's device handle


class Engine(Protocol):
    key: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, Tensor], keep_on_device: Collection[str] = ()) -> dict[str, Tensor]:
        """Run once. Outputs named in ``keep_on_device`` may stay device handles; the rest are numpy."""
        ...


class Backend(Protocol):
    name: str  # "ort-cpu", "ort-cuda", "trt"
    device: str  # "cpu" or "cuda"

    def load(self, key: str, path: Path) -> Engine:
        ...

    def to_numpy(self, value: Tensor) -> np.ndarray:
        ...

    def describe(self) -> dict[str, Any]:
        """Providers, versions and such, for the JSON record and the benchmark."""
        ...


def to_numpy(value: Tensor) -> np.ndarray:
    """A host array from a numpy array or an onnxruntime ``OrtValue`` (on any device)."""
    return value if isinstance(value, np.ndarray) else value.numpy()
