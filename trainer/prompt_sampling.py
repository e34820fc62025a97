"""Training prompts per METHOD.md: jittered boxes or centre-near points, per batch a coin flip.

Prompts are sampled in the model frame (the SAM variant's input: 1024 for the ViTs and
MobileSAM, 512 for EfficientViT-SAM) from masks already resized into it, which is
where the decoder sees them. Every random draw comes from one numpy Generator seeded per
(seed, epoch), so an interrupted run resumed at epoch e draws exactly what it would have.
"""

from __future__ import annotations

import numpy as np

from runtime.prompts import encode_prompts
from casam_core.structures import tight_box

BOX_JITTER_PX = 5.0
#: The frame METHOD.md states the box jitter in; other frames scale it by size / METHOD_FRAME.
METHOD_FRAME = 1024


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """K×H×W masks → K×4 boxes."""
    return np.stack([tight_box(m) for m in masks]).astype(np.float32)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = BOX_JITTER_PX) -> np.ndarray:
    """Tight box with each coordinate moved by uniform ±jitter, kept inside the frame."""
    h, w = mask.shape
    box = tight_box(mask) + rng.uniform(-jitter, jitter, size=4).astype(np.float32)
    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
    x0, x1 = sorted((box[0], box[2]))
    y0, y1 = sorted((box[1], box[3]))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def centre_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One foreground pixel drawn uniformly from the half nearest the mask's centroid.

    Near-centre points are the unambiguous ones; a rim pixel could as well belong to a
    neighbouring structure.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    d2 = (ys - cy) ** 2 + (xs - cx) ** 2
    half = max(1, (len(d2) + 1) // 2)
    nearest = np.argpartition(d2, half - 1)[:half]
    pick = nearest[rng.integers(len(nearest))]
    return np.array([xs[pick], ys[pick]], dtype=np.float32)


def choose_structures(num_structures: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k structure indices: without replacement when there are enough, else with."""
    return rng.choice(num_structures, size=k, replace=num_structures < k)


def sample_prompts(masks: np.ndarray, use_boxes: bool, rng: np.random.Generator,
                   jitter: float = BOX_JITTER_PX) -> tuple[np.ndarray, np.ndarray]:
    """K×S×S frame masks → decoder (point_coords K×P×2, point_labels K×P)."""
    if use_boxes:
        return encode_prompts(boxes=np.stack([jittered_box(m, rng, jitter) for m in masks]))
    points = np.stack([centre_point(m, rng) for m in masks])[:, None, :]
    return encode_prompts(points=points, labels=np.ones(points.shape[:2], np.float32))
