"""Low-resolution mask logits → masks at the original image size, in numpy.

Mirrors segment-anything's ``postprocess_masks``: bilinear upscaling to the model frame,
cropping the padding, bilinear resizing to the original size. The bilinear weights are
built to match ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
so the torch-free runtime reproduces the PyTorch masks.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from runtime.preprocess import Frame


@lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """out×in interpolation matrix, half-pixel centres, edges clamped (align_corners=False)."""
    # float32 arithmetic on purpose: torch's CPU kernel computes source indices in float32,
    # and matching it keeps masks identical at the 0-threshold.
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float64)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    out = m.astype(np.float32)
    out.setflags(write=False)  # shared by every caller through the cache
    return out


def resize_bilinear(maps: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """…×H×W float maps → …×out_h×out_w."""
    h, w = maps.shape[-2:]
    ry = bilinear_matrix(h, out_hw[0])
    rx = bilinear_matrix(w, out_hw[1])
    return np.matmul(np.matmul(ry, maps.astype(np.float32)), rx.T)


def logits_to_original(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """K×1×h×w (or K×h×w) logits → K×H×W float logits at the original size.

    Upscale, crop and resize are each linear, so they are folded into one left and one
    right matrix: the work is K·(H·h·w + H·w·W) instead of going through the 1024 frame.
    """
    logits = np.asarray(low_res, dtype=np.float32)
    if logits.ndim == 4:
        logits = logits[:, 0]
    left, right_t = _folded_matrices(logits.shape[-2:], frame)
    return np.matmul(np.matmul(left, logits), right_t)


@lru_cache(maxsize=64)
def _folded_matrices(low_hw: tuple[int, int], frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """(H×h, w×W) matrices for upscale → crop → resize; cached per frame, as images of one
    size repeat and building them costs more than applying them."""
    (h, w), (rh, rw), (oh, ow) = low_hw, frame.resized_hw, frame.original_hw
    left = bilinear_matrix(rh, oh) @ bilinear_matrix(h, frame.size)[:rh]
    right_t = np.ascontiguousarray((bilinear_matrix(rw, ow) @ bilinear_matrix(w, frame.size)[:rw]).T)
    for m in (left, right_t):
        m.setflags(write=False)
    return left, right_t


def masks_from_logits(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """K×H×W boolean masks: logits at the original size thresholded at 0."""
    return logits_to_original(low_res, frame) > 0.0
