"""Structures in a ground-truth mask: the objects casam prompts for and scores, one definition
for the trainer (training prompts, evaluation) and casam-infer (``--boxes-from-masks``).

A structure is one foreground object: a binary mask has one, a label map has one per
non-zero value (METHOD.md). Structures are kept as an "index map" (0 = background,
1..k = structure), which resizes into the model frame in one nearest pass.
"""

from __future__ import annotations

import numpy as np

from casam_core.errors import InputError

MAX_LABELS = 32  # more distinct values than this: a soft/JPEG-compressed binary mask


def mask_to_index_map(mask: np.ndarray) -> np.ndarray:
    """Any mask → H×W uint8 structure map (0 background, 1..k one value per structure).

    - one non-zero value (0/1, 0/255, …): one structure;
    - 2..MAX_LABELS distinct non-zero values: a label map, one structure per value;
    - more: a soft or JPEG-compressed binary mask, thresholded at half its maximum;
    - colour masks: one structure per distinct non-black colour (greyscale if R=G=B).
    """
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[:, :, :3] if m.shape[2] >= 3 else m[:, :, 0]
        if m.ndim == 3:
            if np.array_equal(m[:, :, 0], m[:, :, 1]) and np.array_equal(m[:, :, 0], m[:, :, 2]):
                m = m[:, :, 0]
            else:
                packed = (m[:, :, 0].astype(np.int64) << 16) | (m[:, :, 1].astype(np.int64) << 8) | m[:, :, 2]
                m = packed
    if m.ndim != 2:
        raise InputError(f"a mask must be H×W or H×W×C, got shape {m.shape}")
    values = np.unique(m)
    values = values[values != 0]
    if len(values) <= 1:
        return (m != 0).astype(np.uint8)
    if len(values) > MAX_LABELS:
        return (m.astype(np.float64) > float(m.max()) / 2.0).astype(np.uint8)
    out = np.zeros(m.shape, np.uint8)
    for i, v in enumerate(values, start=1):
        out[m == v] = i
    return out


def tight_box(mask: np.ndarray) -> np.ndarray:
    """xyxy of a mask's foreground as pixel indices (x_min, y_min, x_max, y_max)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def structure_masks(index_map: np.ndarray) -> np.ndarray:
    """K×H×W bool, one mask per structure of an index map."""
    idx = np.asarray(index_map)
    return idx[None] == np.arange(1, int(idx.max()) + 1, dtype=idx.dtype)[:, None, None]
