"""What an application needs from a predictor, and what each predictor can do, as data.

``runtime.pipeline.Pipeline`` (local engines) and ``runtime.remote.RemotePipeline`` (a
casam-serve server) both implement ``Predictor``; casam-infer and the servers built on the
runtime are written against it. What only some predictors can do (run the encoder alone,
which volume propagation needs; take a previous mask) is declared in ``capabilities``
instead of being discovered with ``hasattr``; a caller that needs more than ``Predictor``
checks the capability and then uses the ``VolumePredictor`` view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from casam_core.errors import InputError
from casam_core.names import IDENTITY
from runtime.preprocess import Frame, Preprocessing
from runtime.prompts import Prompts

#: Slices per encoder call, by the backend's device. On the CPU, batches ran slower per
#: slice than single slices (tiny encoder 61.6 ms per slice at batch 1, 71.9 at 4 and 79.9
#: at 8: onnxruntime already spreads one slice over the cores, and a batch's activations
#: leave the caches; bench/results/volume_latency.md), so the CPU takes one at a time. A GPU
#: is filled by batches (not measured here: no GPU was at hand).
DEFAULT_BATCH = {"cpu": 1, "cuda": 4}


@dataclass
class Result:
    """One image's prediction, from any predictor."""

    masks: np.ndarray  # K×H×W bool at the original size
    low_res_logits: np.ndarray  # K×1×256×256 float32
    iou: np.ndarray  # (K,) float32
    route: str  # task name or "identity"
    scores: dict[str, float]  # every task's score
    thresholds: dict[str, float]
    timings_ms: dict[str, float]  # runtime.pipeline.STAGES locally, the round trip remotely
    warnings: list[str] = field(default_factory=list)  # e.g. boxes clipped to the image


@dataclass(frozen=True)
class Capabilities:
    """What a predictor can do beyond ``predict``.

    ``volumes``: it runs the encoder, router and decoder one by one (``VolumePredictor``),
    which volume propagation needs. ``mask_input``: its decoder takes a previous low-res
    mask (``Prompts.mask_input``). ``encoder_batch``: slices per encoder call that suit its
    device (runtime.volume.DEFAULT_BATCH).
    """

    volumes: bool = False
    mask_input: bool = False
    encoder_batch: int = 1


@runtime_checkable
class Predictor(Protocol):
    """Segments one 2-D image at a time (local engines or a server)."""

    capabilities: Capabilities

    @property
    def preprocessing(self) -> Preprocessing:
        """How raw images become the engines' input; ``prepare``/``read`` apply its intensity."""

    @property
    def task_names(self) -> list[str]:
        """The tasks this predictor can route to (besides "identity")."""

    def predict(self, image: np.ndarray, prompts: Prompts, task: Optional[str] = None) -> Result:
        """One image and its prompts (checked against it) → masks at the original size."""

    def check_task(self, task: str) -> str:
        """``task`` if this predictor knows it (or "identity"); an InputError otherwise."""

    def describe(self) -> dict[str, Any]:
        """What to record beside the outputs: backend, tasks, precision, …"""


class VolumePredictor(Predictor, Protocol):
    """A predictor whose stages run one by one (``capabilities.volumes``)."""

    @property
    def thresholds(self) -> np.ndarray:
        """(N,) routing thresholds, in ``task_names`` order."""

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Preprocessed B×3×S×S inputs → B×256×64×64 raw embeddings."""

    def route(self, embeddings: np.ndarray, task: Optional[str] = None) -> tuple[str, np.ndarray, np.ndarray]:
        """One raw embedding → (route, scores (N,), thresholds (N,))."""

    def choose(self, scores: np.ndarray, task: Optional[str] = None) -> str:
        """The route for (N,) scores."""

    def align(self, embedding: np.ndarray, route: str) -> np.ndarray:
        """One raw embedding through ``route``'s alignment layer (the identity: unchanged)."""

    def decode(self, embedding: np.ndarray, frame: Frame, prompts: Prompts,
               route: str = IDENTITY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A raw embedding and prompts → (K×H×W masks, K×1×256×256 logits, (K,) IoU)."""


def volume_predictor(pipe: Predictor, what: str = "volume input") -> VolumePredictor:
    """``pipe`` as a ``VolumePredictor``, or an InputError saying it cannot run volumes."""
    if not pipe.capabilities.volumes:
        raise InputError(f"{what} runs on local engines only; drop --server for volume input")
    return pipe  # type: ignore[return-value]  # declared by capabilities.volumes


__all__: Sequence[str] = ("Capabilities", "Predictor", "Result", "VolumePredictor", "volume_predictor")
