"""Low-resolution mask logits → masks at the original image size, in numpy.

Mirrors segment-anything's ``postprocess_masks``: bilinear upscaling to the model frame,
cropping the padding, bilinear resizing to the original size. The bilinear weights are
built to match ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
so the torch-free runtime reproduces the PyTorch masks.

Upscale, crop and resize are each linear along rows and along columns, so they fold into
one left (H×h) and one right (w×W) matrix. Each folded matrix is a band of two or three
taps per output row or column (two adjacent bilinear steps), so it is applied as a few
whole-row gathers and multiply-adds rather than as a dense matrix product: the dense form
spends K·H·h·W multiply-adds (250 M for one 768×1024 mask) on zeros, the banded form about
K·H·W·taps (2.4 M). Gathering whole rows (``np.take`` on axis −2) copies contiguous memory,
so the column pass runs on the transposed low-resolution array and gathers rows too.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Taps:
    """A banded out×in matrix as ``taps`` (index, weight) columns: row ``r`` of the product
    is ``Σ_t weight[r, t] · x[index[r, t]]``. Rows with fewer taps are padded with weight 0."""

    index: np.ndarray  # out×taps int64
    weight: np.ndarray  # out×taps×1 float32 (broadcasts over a row)

    @classmethod
    def from_dense(cls, matrix: np.ndarray) -> "Taps":
        nonzero = matrix != 0
        taps = max(int(nonzero.sum(axis=1).max()), 1)
        # Column order of the nonzeros in each row, padded with column 0 at weight 0.
        order = np.argsort(~nonzero, axis=1, kind="stable")[:, :taps]
        weight = np.take_along_axis(matrix, order, axis=1)
        index = np.where(np.take_along_axis(nonzero, order, axis=1), order, 0)
        for a in (index, weight):
            a.setflags(write=False)
        return cls(index.astype(np.int64), np.ascontiguousarray(weight[:, :, None], dtype=np.float32))

    def apply_rows(self, x: np.ndarray) -> np.ndarray:
        """K×in×n → K×out×n: the banded matrix times each K slice (whole-row gathers)."""
        out = np.take(x, self.index[:, 0], axis=1)
        out *= self.weight[:, 0]
        scratch = np.empty_like(out) if self.index.shape[1] > 1 else None
        for t in range(1, self.index.shape[1]):
            np.take(x, self.index[:, t], axis=1, out=scratch)
            scratch *= self.weight[:, t]
            out += scratch
        return out


def resize_bilinear(maps: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """…×H×W float maps → …×out_h×out_w."""
    h, w = maps.shape[-2:]
    ry = bilinear_matrix(h, out_hw[0])
    rx = bilinear_matrix(w, out_hw[1])
    return np.matmul(np.matmul(ry, maps.astype(np.float32)), rx.T)


def logits_to_original(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """K×1×h×w (or K×h×w) logits → K×H×W float logits at the original size."""
    logits = np.asarray(low_res, dtype=np.float32)
    if logits.ndim == 4:
        logits = logits[:, 0]
    rows, cols = _folded_taps(logits.shape[-2:], frame)
    # Columns first, on the small side: K×w×h (transposed view) → K×W×h → K×h×W.
    widened = np.ascontiguousarray(cols.apply_rows(logits.transpose(0, 2, 1)).transpose(0, 2, 1))
    return rows.apply_rows(widened)


@lru_cache(maxsize=64)
def _folded_taps(low_hw: tuple[int, int], frame: Frame) -> tuple[Taps, Taps]:
    """Row taps (H from h) and column taps (W from w) of upscale → crop → resize; cached per
    frame, as images of one size repeat and building them costs more than applying them."""
    (h, w), (rh, rw), (oh, ow) = low_hw, frame.resized_hw, frame.original_hw
    left = bilinear_matrix(rh, oh).astype(np.float64) @ bilinear_matrix(h, frame.size)[:rh]
    right = bilinear_matrix(rw, ow).astype(np.float64) @ bilinear_matrix(w, frame.size)[:rw]
    return Taps.from_dense(left.astype(np.float32)), Taps.from_dense(right.astype(np.float32))


def masks_from_logits(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """K×H×W boolean masks: logits at the original size thresholded at 0."""
    return logits_to_original(low_res, frame) > 0.0
