"""Validating user prompts in original pixels, before they reach the decoder.

A malformed box (inverted, empty, NaN, off the image) does not crash SAM: it quietly
yields a meaningless mask. These checks turn such input into one clear InputError, and
clip a box that only overhangs the image, reporting that as a warning.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from casam_core.errors import InputError


def check_boxes(boxes: Optional[np.ndarray], height: int, width: int) -> tuple[Optional[np.ndarray], list[str]]:
    """K×4 xyxy boxes → (boxes clipped to the image, warnings). Raises on unusable boxes."""
    if boxes is None:
        return None, []
    bx = np.asarray(boxes, dtype=np.float64)
    if bx.ndim == 1 and bx.size == 4:
        bx = bx[None]
    if bx.ndim != 2 or bx.shape[1] != 4 or bx.shape[0] == 0:
        raise InputError(f"boxes must be K×4 (x0 y0 x1 y1), got shape {bx.shape}")
    warnings: list[str] = []
    clipped = bx.copy()
    for k, (x0, y0, x1, y1) in enumerate(bx):
        text = f"box #{k + 1} ({_fmt(bx[k])})"
        if not np.isfinite(bx[k]).all():
            raise InputError(f"{text} holds NaN or infinity")
        if x1 < x0 or y1 < y0:
            raise InputError(f"{text} is inverted: give x0 y0 x1 y1 with x0 < x1 and y0 < y1")
        if x1 == x0 or y1 == y0:
            raise InputError(f"{text} has zero area")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise InputError(f"{text} lies wholly outside the {width}×{height} image")
        clipped[k] = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
        if not np.array_equal(clipped[k], bx[k]):
            warnings.append(f"{text} extends past the {width}×{height} image; clipped to ({_fmt(clipped[k])})")
    return clipped.astype(np.float32), warnings


def check_points(
    points: Optional[np.ndarray], labels: Optional[np.ndarray], height: int, width: int
) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """K×P×2 points and K×P labels (0 negative, 1 positive; default all positive)."""
    if points is None:
        if labels is not None:
            raise InputError("point labels were given without points")
        return None, None
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 2:
        pts = pts[:, None, :]
    if pts.ndim != 3 or pts.shape[2] != 2 or pts.shape[0] == 0 or pts.shape[1] == 0:
        raise InputError(f"points must be K×P×2 (x y), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise InputError("a point holds NaN or infinity")
    outside = (pts[..., 0] < 0) | (pts[..., 1] < 0) | (pts[..., 0] > width) | (pts[..., 1] > height)
    if outside.any():
        k, p = np.argwhere(outside)[0]
        raise InputError(f"point ({_fmt(pts[k, p])}) lies outside the {width}×{height} image")
    if labels is None:
        lab = np.ones(pts.shape[:2], dtype=np.float32)
    else:
        lab = np.asarray(labels, dtype=np.float64)
        if lab.size != pts.shape[0] * pts.shape[1]:
            raise InputError(f"{lab.size} point labels for {pts.shape[0] * pts.shape[1]} points: give one per point")
        lab = lab.reshape(pts.shape[:2])
        if not np.isin(lab, (0, 1)).all():
            raise InputError("point labels must be 0 (background) or 1 (foreground)")
    return pts.astype(np.float32), lab.astype(np.float32)


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:g}" for v in values)
