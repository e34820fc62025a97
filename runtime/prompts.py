"""Boxes and points → the decoder's (point_coords, point_labels) pair.

SAM's prompt encoder embeds a box as its two corners with labels 2 and 3, and pads a
points-only prompt with one (0, 0) point of label -1. Encoding every prompt this way gives
the decoder one input signature for boxes, points or both, which is how the exported
decoder graph takes them, and the PyTorch model uses this same function.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from casam_core.errors import InputError

BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PADDING = 2, 3, -1


def encode_prompts(
    boxes: Optional[np.ndarray] = None,
    points: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """K boxes (K×4) and/or K point sets (K×P×2, labels K×P) → (K×P'×2 float32, K×P' float32).

    Layout matches segment-anything's PromptEncoder: points first, then the box corners;
    a padding point only when there is no box.
    """
    if boxes is None and points is None:
        raise InputError("a prompt needs at least one box or one point")
    parts_xy: list[np.ndarray] = []
    parts_lab: list[np.ndarray] = []
    k: Optional[int] = None
    if points is not None:
        pts = np.asarray(points, dtype=np.float32)
        if pts.ndim == 2:
            pts = pts[:, None, :]
        if pts.ndim != 3 or pts.shape[2] != 2:
            raise InputError(f"points must be K×P×2, got shape {pts.shape}")
        lab = np.ones(pts.shape[:2], np.float32) if labels is None else np.asarray(labels, np.float32).reshape(pts.shape[:2])
        k = pts.shape[0]
        parts_xy.append(pts)
        parts_lab.append(lab)
    if boxes is not None:
        bx = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if k is not None and bx.shape[0] != k:
            raise InputError(f"{bx.shape[0]} boxes and {k} point sets: give one of each per prompt")
        k = bx.shape[0]
        parts_xy.append(bx.reshape(-1, 2, 2))
        parts_lab.append(np.tile(np.array([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]], np.float32), (k, 1)))
    else:
        assert k is not None
        parts_xy.append(np.zeros((k, 1, 2), np.float32))
        parts_lab.append(np.full((k, 1), PADDING, np.float32))
    return np.concatenate(parts_xy, axis=1), np.concatenate(parts_lab, axis=1)
