"""Segmentation and continual-learning metrics, exactly as METHOD.md defines them.

Masks are compared at the original image size (predictions are ``logits > 0`` after
``runtime.postprocess``), so the trainer reports what the deployed runtime would produce.
They live in the torch-free runtime so that casam-infer scores a deployment on a site's own
labelled cases with the very definitions the trainer reports (one implementation).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

IOU_EPS = 1e-7


def iou(pred: np.ndarray, gt: np.ndarray, eps: float = IOU_EPS) -> float:
    """|P∩G| / (|P∪G| + eps); two empty masks score 0."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = np.logical_and(p, g).sum()
    union = np.logical_or(p, g).sum()
    return float(inter / (union + eps))


def band_width(height: int, width: int) -> int:
    """Side of the boundary dilation: round(0.02·diagonal), made odd (29 at 1024×1024)."""
    side = int(round(0.02 * math.hypot(height, width)))
    return max(1, side if side % 2 == 1 else side + 1)


def _square_filter(mask: np.ndarray, side: int, erode: bool) -> np.ndarray:
    """Separable square min (erode) or max (dilate) filter with a centred odd window.

    Erosion pads with foreground (OpenCV's default border), so an image edge is not a
    boundary; dilation pads with background.
    """
    r = side // 2
    out = np.asarray(mask, bool)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        padded = np.pad(out, pad, constant_values=erode)
        windows = np.lib.stride_tricks.sliding_window_view(padded, side, axis=axis)
        out = windows.all(axis=-1) if erode else windows.any(axis=-1)
    return out


def boundary(mask: np.ndarray) -> np.ndarray:
    """mask − erode(mask, 3×3)."""
    m = np.asarray(mask, bool)
    return m & ~_square_filter(m, 3, erode=True)


def boundary_iou(pred: np.ndarray, gt: np.ndarray, side: int | None = None, eps: float = IOU_EPS) -> float:
    """IoU of the two boundaries, each dilated by a square of ``side`` (default band_width)."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    side = band_width(*g.shape) if side is None else side
    return iou(_square_filter(boundary(p), side, erode=False), _square_filter(boundary(g), side, erode=False), eps)


def image_scores(preds: np.ndarray, gts: np.ndarray) -> tuple[float, float]:
    """One image's K predicted and K true masks → (mean IoU, mean BIoU) over its masks."""
    side = band_width(*gts.shape[-2:])
    ious = [iou(p, g) for p, g in zip(preds, gts)]
    bious = [boundary_iou(p, g, side) for p, g in zip(preds, gts)]
    return float(np.mean(ious)), float(np.mean(bious))


def continual_metrics(matrix: Sequence[Sequence[float]], sizes: Sequence[int]) -> dict[str, object]:
    """IoU_{k,t} (task k after stage t; entries with k > t ignored) and test sizes n_k →
    per-stage IoU_t, Last, Avg and FF (METHOD.md).

    ``IoU_t = Σ_{k≤t} n_k IoU_{k,t} / Σ_{k≤t} n_k``; ``Last = IoU_N``; ``Avg = mean_t IoU_t``;
    ``FF = mean_{k<N} max_{k≤j<N} (IoU_{k,j} − IoU_{k,N})`` (0 for a single task).
    """
    m = np.asarray(matrix, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    stages = m.shape[1]
    if m.shape != (stages, stages) or n.shape != (stages,):
        raise ValueError(f"expected an N×N matrix and N sizes, got {m.shape} and {n.shape}")
    per_stage = [float((n[: t + 1] * m[: t + 1, t]).sum() / n[: t + 1].sum()) for t in range(stages)]
    last = stages - 1
    drops = [float(np.max(m[k, k:last] - m[k, last])) for k in range(last)]
    return {
        "per_stage": per_stage,
        "last": per_stage[-1],
        "avg": float(np.mean(per_stage)),
        "ff": float(np.mean(drops)) if drops else 0.0,
    }
