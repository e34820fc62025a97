"""Segmentation and continual-learning metrics, exactly as METHOD.md defines them.

Masks are compared at the original image size (predictions are ``logits > 0`` after
``runtime.postprocess``), so the trainer reports what the deployed runtime would produce.
They live in the torch-free runtime so that casam-infer scores a deployment on a site's own
labelled cases with the very definitions the trainer reports (one implementation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from casam_core.optional import optional_import

IOU_EPS = 1e-7


def iou(pred: np.ndarray, gt: np.ndarray, eps: float = IOU_EPS) -> float:
    """|P∩G| / (|P∪G| + eps); two empty masks score 0."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = np.logical_and(p, g).sum()
    union = np.logical_or(p, g).sum()
    return float(inter / (union + eps))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|), any number of dimensions; two empty masks score 1 (nothing to
    find, nothing found), one empty mask 0."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else float(2 * int(np.logical_and(p, g).sum()) / total)


def ndimage() -> Any:
    """``scipy.ndimage`` (the ``eval`` extra): distance transforms and connected components."""
    return optional_import("scipy.ndimage", "eval", "the normalised surface distance and click simulation",
                           package="scipy")


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's surface voxels: foreground with a face neighbour (4 in 2-D, 6 in 3-D) in the
    background. Outside the array counts as background, so an object cut by the image edge
    has a surface there (as in the surface-distance code of the challenges)."""
    m = np.asarray(mask, bool)
    return m & ~ndimage().binary_erosion(m, border_value=0)


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Normalised surface distance (surface Dice) at ``tolerance`` in the units of ``spacing``
    (mm per voxel along each array axis): the fraction of both surfaces lying within the
    tolerance of the other, ``(|∂P within τ of ∂G| + |∂G within τ of ∂P|) / (|∂P| + |∂G|)``.

    Works in the masks' own dimension: a 2-D image's contours, or a volume's 3-D surface
    (not slice by slice). Surface elements are counted as voxels (as MONAI's
    ``compute_surface_dice`` does), where DeepMind's ``surface-distance`` (the CVPR
    challenges' ``SurfaceDice.py``) weights each surface element by its area; on smooth
    shapes the two agree to a few percent. Two empty masks score 1, one empty mask 0."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape or len(spacing) != p.ndim:
        raise ValueError(f"nsd needs two masks of one shape and one spacing per axis: {p.shape}, {g.shape}, "
                         f"{tuple(spacing)}")
    sp, sg = surface(p), surface(g)
    if not sp.any() and not sg.any():
        return 1.0
    if not sp.any() or not sg.any():
        return 0.0
    on = np.argwhere(sp | sg)  # crop to both surfaces: every distance read is to a surface voxel inside
    lo, hi = on.min(axis=0), on.max(axis=0) + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp, sg = sp[crop], sg[crop]
    edt = ndimage().distance_transform_edt
    to_g = edt(~sg, sampling=[float(s) for s in spacing])
    to_p = edt(~sp, sampling=[float(s) for s in spacing])
    near = int((to_g[sp] <= tolerance).sum()) + int((to_p[sg] <= tolerance).sum())
    return float(near / (int(sp.sum()) + int(sg.sum())))


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
