"""Low-resolution mask logits → masks at the original image size, in numpy.

Mirrors segment-anything's ``postprocess_masks``: bilinear upscaling to the model frame,
cropping the padding, bilinear resizing to the original size. The bilinear weights are
built to match ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
so the torch-free runtime reproduces the PyTorch masks.

Upscale, crop and resize are each linear along rows and along columns, so they fold into
one left (H×h) and one right (w×W) matrix per frame. Each folded matrix is a narrow band
(two chained bilinear steps read at most three adjacent inputs per output), so it is cut
into blocks of ``BLOCK`` output rows, each with the few dozen input rows it reads, and each
block is one small matrix product: the BLAS kernel fuses the taps' multiply-adds in
registers, where elementwise numpy made a pass over the whole output per tap, gather and
add (3× slower than torch on a 768×1024 mask; the blocks are 3× faster than torch). The
dense form would spend K·H·h·W multiply-adds (250 M for one 768×1024 mask) on zeros; the
blocks spend about K·H·W·(BLOCK/scale + 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np

from runtime.preprocess import Frame

BLOCK = 32  # output rows per product: small enough to skip the zeros, large enough for BLAS


@lru_cache(maxsize=64)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1): output row r reads inputs i0[r] and i1[r] with float32 weights w0[r]
    and w1[r], half-pixel centres, edges clamped (align_corners=False). Where the clamp
    makes i0 == i1 the two weights are merged into w0, as the matrix holds one entry."""
    # float32 arithmetic on purpose: torch's CPU kernel computes source indices in float32,
    # and matching it keeps masks identical at the 0-threshold.
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float64)
    same = i0 == i1
    w0 = np.where(same, (1.0 - frac) + frac, 1.0 - frac).astype(np.float32)
    w1 = np.where(same, 0.0, frac).astype(np.float32)
    for array in (i0, i1, w0, w1):
        array.setflags(write=False)  # shared by every caller through the cache
    return i0, i1, w0, w1


@lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """out×in interpolation matrix (float32) of ``bilinear_taps``."""
    i0, i1, w0, w1 = bilinear_taps(in_size, out_size)
    m = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    m[rows, i1] = w1
    m[rows, i0] = w0  # after w1: where i0 == i1, w0 holds both and w1 is 0
    m.setflags(write=False)  # shared by every caller through the cache
    return m


def _then(outer: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], inner: np.ndarray) -> np.ndarray:
    """The float64 product of ``outer``'s interpolation matrix and ``inner``, from its two taps
    per row: O(out × inner columns), where the dense product costs O(out × in × columns)
    (paid once per image size; BENCHMARKS.md, "Edge speed", has bench/postprocess_build.py's
    figures)."""
    i0, i1, w0, w1 = outer
    return w0[:, None].astype(np.float64) * inner[i0] + w1[:, None].astype(np.float64) * inner[i1]


@dataclass(frozen=True)
class Band:
    """A banded out×in matrix as row blocks: rows [start, stop) of the product read only
    inputs [lo, hi), through the dense block ``matrix`` ((stop-start)×(hi-lo), float32)."""

    out_size: int
    blocks: tuple[tuple[int, int, int, int, np.ndarray], ...]

    @classmethod
    def from_dense(cls, matrix: np.ndarray, block: int = BLOCK) -> "Band":
        parts = []
        for start in range(0, matrix.shape[0], block):
            sub = matrix[start:start + block]
            used = np.flatnonzero((sub != 0).any(axis=0))
            lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
            part = np.ascontiguousarray(sub[:, lo:hi], dtype=np.float32)
            part.setflags(write=False)  # shared by every caller through the cache
            parts.append((start, start + sub.shape[0], lo, hi, part))
        return cls(matrix.shape[0], tuple(parts))

    def left(self, x: np.ndarray) -> np.ndarray:
        """in×n → out×n (this matrix times ``x``)."""
        out = np.empty((self.out_size, x.shape[1]), dtype=np.float32)
        for start, stop, block in self.left_blocks(x):
            out[start:stop] = block
        return out

    def left_blocks(self, x: np.ndarray, needed: Optional[np.ndarray] = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, rows start…stop of this matrix times ``x``), block by block; with
        ``needed`` (one bool per input row), blocks that read no needed row are skipped."""
        for start, stop, lo, hi, part in self.blocks:
            if needed is None or needed[lo:hi].any():
                yield start, stop, part @ x[lo:hi]

    def right(self, x: np.ndarray) -> np.ndarray:
        """n×in → n×out (``x`` times this matrix transposed)."""
        out = np.empty((x.shape[0], self.out_size), dtype=np.float32)
        for start, stop, lo, hi, part in self.blocks:
            np.matmul(x[:, lo:hi], part.T, out=out[:, start:stop])
        return out


def resize_bilinear(maps: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """…×H×W float maps → …×out_h×out_w."""
    h, w = maps.shape[-2:]
    ry = bilinear_matrix(h, out_hw[0])
    rx = bilinear_matrix(w, out_hw[1])
    return np.matmul(np.matmul(ry, maps.astype(np.float32)), rx.T)


def logits_to_original(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """K×1×h×w (or K×h×w) logits → K×H×W float logits at the original size."""
    logits = _as_khw(low_res)
    rows, cols = _folded_bands(logits.shape[-2:], frame)
    out = np.empty((logits.shape[0], *frame.original_hw), dtype=np.float32)
    for k, low in enumerate(logits):
        out[k] = rows.left(cols.right(low))  # columns first: the narrow side is widened once
    return out


def masks_from_logits(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """K×H×W boolean masks: logits at the original size thresholded at 0.

    The same products as ``logits_to_original`` (so the same values), except that a block
    of output rows that reads only logits ≤ 0 is left false without computing it: every
    folded weight is ≥ 0, so its pixels are sums of products ≤ 0, and rounding never
    changes a sign.
    """
    logits = _as_khw(low_res)
    rows, cols = _folded_bands(logits.shape[-2:], frame)
    out = np.zeros((logits.shape[0], *frame.original_hw), dtype=bool)
    for k, low in enumerate(logits):
        positive_rows = (low > 0.0).any(axis=1)
        if not positive_rows.any():
            continue
        for start, stop, block in rows.left_blocks(cols.right(low), needed=positive_rows):
            np.greater(block, 0.0, out=out[k, start:stop])
    return out


def _as_khw(low_res: np.ndarray) -> np.ndarray:
    logits = np.asarray(low_res, dtype=np.float32)
    return logits[:, 0] if logits.ndim == 4 else logits


@lru_cache(maxsize=64)
def _folded_bands(low_hw: tuple[int, int], frame: Frame) -> tuple[Band, Band]:
    """Row band (H from h) and column band (W from w) of upscale → crop → resize; cached per
    frame, as images of one size repeat and building them costs more than applying them."""
    (h, w), (rh, rw), (oh, ow) = low_hw, frame.resized_hw, frame.original_hw
    left = _then(bilinear_taps(rh, oh), bilinear_matrix(h, frame.size)[:rh].astype(np.float64))
    right = _then(bilinear_taps(rw, ow), bilinear_matrix(w, frame.size)[:rw].astype(np.float64))
    return Band.from_dense(left.astype(np.float32)), Band.from_dense(right.astype(np.float32))
