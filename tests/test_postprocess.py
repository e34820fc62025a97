"""Banded post-processing: the same linear map as the dense folded matrices and as torch's
upscale → crop → resize, at a cost bounded by a few taps per output pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.postprocess import Taps, _folded_taps, bilinear_matrix, logits_to_original, masks_from_logits
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
    """Two chained bilinear steps touch at most three adjacent low-resolution rows, so the
    cost per output pixel stays a few multiply-adds, whatever the image size."""
    rows, cols = _folded_taps((256, 256), frame_for(*hw, Preprocessing(resize=resize)))
    for taps in (rows, cols):
        assert taps.index.shape[1] <= 3
        real = taps.weight[:, :, 0] != 0
        spread = np.where(real, taps.index, -1).max(1) - np.where(real, taps.index, 1 << 30).min(1)
        assert spread.max() <= 2


def test_taps_from_dense_round_trip():
    m = np.array([[0.25, 0.75, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.5, 0.5]], np.float32)
    taps = Taps.from_dense(m)
    x = np.arange(8, dtype=np.float32).reshape(1, 4, 2) - 3
    np.testing.assert_array_equal(taps.apply_rows(x), (m @ x[0])[None])
