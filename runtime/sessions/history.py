"""One label's prompts and masks on one slice, step by step, so corrections can be undone.

Each step keeps the prompts that produced it (a box and the clicks so far) and the mask,
bit-packed; the newest ``LOGIT_STEPS`` steps also keep the decoder's low-res logits (as
float16), which the next click feeds back as ``mask_input``. Logits are 256×256 whatever
the image: 128 kB a step, sixteen times a 512² packed mask. Kept on every step, eight
annotators' undo histories grew their server by 13–17 % after warm-up and past its memory
bound (BENCHMARKS.md, "bench/interactive_latency.py"); a click after undoing further back
than ``LOGIT_STEPS`` decodes from its prompts alone, as SAM's first click does. The depth
of undo is bounded too (``MAX_UNDO``), so a long session cannot grow without end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

#: Steps kept per label and slice; older ones are forgotten (undo stops there).
MAX_UNDO = 32
#: The newest steps per label and slice that keep their logits for ``mask_input``.
LOGIT_STEPS = 4


@dataclass(frozen=True)
class Step:
    """One interaction's prompts and result, in slice pixels."""

    box: Optional[tuple[float, float, float, float]]
    points: tuple[tuple[float, float], ...]
    point_labels: tuple[int, ...]  # 1 positive, 0 negative
    packed_mask: np.ndarray  # np.packbits of the H×W bool mask
    shape: tuple[int, int]
    logits: Optional[np.ndarray]  # 1×1×256×256 float16, or None when not kept
    source: str = "prompt"  # "prompt", "click", "propagated"

    @classmethod
    def make(cls, box: Optional[tuple[float, float, float, float]], points: tuple[tuple[float, float], ...],
             point_labels: tuple[int, ...], mask: np.ndarray, logits: Optional[np.ndarray],
             source: str = "prompt") -> "Step":
        small = None if logits is None else np.asarray(logits, dtype=np.float16).reshape(1, 1, *logits.shape[-2:])
        return cls(box, points, point_labels, np.packbits(np.asarray(mask, dtype=bool)),
                   (int(mask.shape[0]), int(mask.shape[1])), small, source)

    @property
    def mask(self) -> np.ndarray:
        h, w = self.shape
        return np.unpackbits(self.packed_mask, count=h * w).reshape(h, w).astype(bool)

    @property
    def mask_input(self) -> Optional[np.ndarray]:
        return None if self.logits is None else self.logits.astype(np.float32)


@dataclass
class SliceHistory:
    """The steps of one label on one slice; the last is what the slice shows."""

    steps: list[Step] = field(default_factory=list)

    @property
    def current(self) -> Optional[Step]:
        return self.steps[-1] if self.steps else None

    def push(self, step: Step) -> None:
        """Make ``step`` current; the step that leaves the newest ``LOGIT_STEPS`` drops its logits."""
        self.steps.append(step)
        del self.steps[:-MAX_UNDO]
        if len(self.steps) > LOGIT_STEPS and self.steps[-LOGIT_STEPS - 1].logits is not None:
            self.steps[-LOGIT_STEPS - 1] = replace(self.steps[-LOGIT_STEPS - 1], logits=None)

    def undo(self) -> Optional[Step]:
        """Drop the last step; the one before it (or None: nothing left) is current again."""
        if self.steps:
            self.steps.pop()
        return self.current
