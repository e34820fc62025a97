"""Banded post-processing: the same linear map as the dense folded matrices and as torch's
upscale → crop → resize, computed as small products over the few inputs each block reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.postprocess import (BLOCK, Band, _folded_bands, _then, bilinear_matrix, bilinear_taps, logits_to_original,
                                masks_from_logits)
from runtime.preprocess import Preprocessing, frame_for

FRAMES = [((768, 1024), "longest"),  # the benchmark's image: the final resize is the identity
          ((333, 1000), "longest"),  # odd crop, downscaled to the original
          ((1100, 1300), "longest"),  # upscaled past the model frame
          ((100, 200), "longest"),  # strong downscale
          ((300, 200), "stretch")]
EPS32 = float(np.finfo(np.float32).eps)


def dense(low: np.ndarray, frame) -> np.ndarray:
    """The folded map as two dense products (what the runtime did before the banded form)."""
    (rh, rw), (oh, ow) = frame.resized_hw, frame.original_hw
    left = bilinear_matrix(rh, oh).astype(np.float64) @ bilinear_matrix(low.shape[-2], frame.size)[:rh]
    right = bilinear_matrix(rw, ow).astype(np.float64) @ bilinear_matrix(low.shape[-1], frame.size)[:rw]
    return (left @ low.astype(np.float64) @ right.T).astype(np.float32)


@pytest.mark.parametrize("hw,resize", FRAMES)
def test_banded_equals_dense_and_torch(hw, resize):
    frame = frame_for(*hw, Preprocessing(resize=resize))
    low = (torch.randn(2, 1, 256, 256, generator=torch.Generator().manual_seed(1)) * 4)
    got = logits_to_original(low.numpy(), frame)
    assert got.shape == (2, *hw) and got.dtype == np.float32
    # Against the same map in float64: each output is a convex combination of at most
    # taps² ≤ 9 inputs computed with two float32 rounding stages of ≤ 3 products and adds
    # each, plus the float32 rounding of the folded weights: ≤ 16 ulp of the largest input.
    scale = float(np.abs(low.numpy()).max())
    np.testing.assert_allclose(got, dense(low.numpy()[:, 0], frame), rtol=0, atol=16 * EPS32 * scale)
    ref = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[..., : frame.resized_hw[0], : frame.resized_hw[1]], hw, mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    # torch rounds each stage's source coordinate in float32 too, but not always in the same
    # operation order (fused multiply-add): a position off by one ulp of 1024 (1.2e-4 px)
    # times a slope of at most 2·max|x| per pixel, as in tests/test_preprocess.py.
    np.testing.assert_allclose(got, ref, rtol=0, atol=2 * 1.2e-4 * scale)
    assert (masks_from_logits(low.numpy(), frame) == (ref > 0)).mean() > 0.9999


@pytest.mark.parametrize("hw,resize", FRAMES)
def test_folded_maps_are_narrow_bands(hw, resize):
    """Two chained bilinear steps read at most three adjacent low-resolution rows per output
    row, so a block of BLOCK output rows reads about BLOCK/scale + 3 inputs, not all 256:
    the products skip the zeros of the dense map."""
    frame = frame_for(*hw, Preprocessing(resize=resize))
    for band, out_size in zip(_folded_bands((256, 256), frame), frame.original_hw):
        scale = out_size / 256
        assert band.blocks[-1][1] == out_size
        for start, stop, lo, hi, part in band.blocks:
            assert hi - lo <= (stop - start) / scale + 3
            assert part.shape == (stop - start, hi - lo)


def test_band_products_equal_the_dense_matrix():
    rng = np.random.default_rng(3)
    m = np.zeros((70, 40), np.float32)  # a staircase band over three blocks of 32 rows
    for r in range(70):
        c = min(r * 40 // 70, 38)
        m[r, c:c + 2] = rng.random(2)
    band = Band.from_dense(m)
    assert len(band.blocks) == -(-70 // BLOCK)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    # Against float64: each output is a sum of two float32 products (the zeros of a block add
    # exactly), fused or not by the BLAS kernel: at most 2 roundings, each ≤ eps/2 of a value
    # ≤ 2·max|m|·max|x|.
    bound = 2 * EPS32 * float(np.abs(m).max() * np.abs(x).max())
    exact = m.astype(np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(band.left(x), exact, rtol=0, atol=bound)
    np.testing.assert_allclose(band.right(x.T), exact.T, rtol=0, atol=bound)


@pytest.mark.parametrize("hw,resize", FRAMES)
def test_masks_skip_only_blocks_that_cannot_be_true(hw, resize):
    """masks_from_logits leaves blocks that read no positive logit uncomputed; the masks must
    still equal the thresholded full map exactly, for objects small, off-centre, at an edge
    and everywhere."""
    frame = frame_for(*hw, Preprocessing(resize=resize))
    yy, xx = np.mgrid[0:256, 0:256]
    low = np.stack([(12 - np.hypot(yy - 40, xx - 200)) / 3,  # small, off-centre
                    (30 - np.hypot(yy - 250, xx - 5)) / 3,  # at a corner
                    np.random.default_rng(1).normal(size=(256, 256)) * 4,  # speckle everywhere
                    -np.ones((256, 256))]).astype(np.float32)  # nothing
    low[3, 20, 20] = 50.0  # …but one strongly positive logit, inside every frame's content
    got = masks_from_logits(low[:, None], frame)
    np.testing.assert_array_equal(got, logits_to_original(low, frame) > 0)
    assert got[3].any() and 0 < got[0].sum() < got[0].size / 4


@pytest.mark.parametrize("in_size,out_size", [(700, 1000), (1024, 224), (5, 3), (1, 7), (767, 576)])
def test_folding_from_taps_equals_the_dense_product(in_size, out_size):
    """The folded maps are built from the outer step's two taps per row (postprocess._then),
    not a dense product that costs about 3× as much per new image size; both are float64 sums of the
    same one or two nonzero products, so they differ by at most three float64 roundings
    (two products, one sum) of terms no larger than max|inner| (every weight is ≤ 1)."""
    inner = np.random.default_rng(in_size).normal(size=(in_size, 64))
    dense = bilinear_matrix(in_size, out_size).astype(np.float64) @ inner
    bound = 3 * np.finfo(np.float64).eps * np.abs(inner).max()
    np.testing.assert_allclose(_then(bilinear_taps(in_size, out_size), inner), dense, rtol=0, atol=bound)
