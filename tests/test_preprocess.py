"""Numpy preprocessing and postprocessing: SAM's conventions, messy inputs, torch parity."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from casam_core.errors import InputError
from casam_io.image_io import read_scan
from runtime.postprocess import bilinear_matrix, logits_to_original, masks_from_logits, resize_bilinear
from casam_io.intensity import Intensity
from runtime.preprocess import (PIXEL_MEAN, PIXEL_STD, Preprocessing, boxes_to_frame, frame_for, preprocess,
                                resize_mask_to_frame, to_rgb_255)
from float32 import CROSS_LIBRARY, EPS32, SAME_LIBRARY, f32_tol, peak


def test_longest_side_frame_uses_sams_rounding():
    prep = Preprocessing()
    assert frame_for(480, 640, prep).resized_hw == (768, 1024)
    assert frame_for(1000, 333, prep).resized_hw == (1024, 341)  # 333*1.024 = 340.99 -> 341
    assert frame_for(224, 224, prep).resized_hw == (1024, 1024)
    assert frame_for(480, 640, Preprocessing(resize="stretch")).resized_hw == (1024, 1024)
    with pytest.raises(InputError, match="resize mode"):
        Preprocessing(resize="crop")


def test_preprocess_normalises_and_pads_bottom_right():
    image = np.full((100, 200, 3), (200, 100, 50), dtype=np.uint8)
    x, frame = preprocess(image, Preprocessing())
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
    assert frame.resized_hw == (512, 1024)
    expected = (np.array([200, 100, 50]) - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
    # (v − mean)/std in float32 after resizing a flat image (≤ 4 taps of one value): M = |expected|.
    np.testing.assert_allclose(x[0, :, 10, 10], expected, rtol=0, atol=f32_tol(peak(expected), n=4))
    assert np.all(x[0, :, 512:, :] == 0.0), "padding must be zeros after normalisation"
    xs, fs = preprocess(image, Preprocessing(resize="stretch"))
    np.testing.assert_allclose(xs[0, :, 1000, 10], expected, rtol=0, atol=f32_tol(peak(expected), n=4))


@pytest.mark.parametrize("hw,resize", [((300, 500), "longest"), ((1024, 700), "longest"), ((90, 60), "stretch")])
def test_preprocess_is_sams_float_arithmetic_exactly(hw, resize):
    """Normalising by table lookup gives bit-for-bit what (resized - mean) / std gives in float32."""
    prep = Preprocessing(resize=resize)
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    x, frame = preprocess(image, prep)
    rh, rw = frame.resized_hw
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR)).astype(np.float32)
    expected = np.zeros((1, 3, 1024, 1024), np.float32)
    expected[0, :, :rh, :rw] = ((resized - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)).transpose(2, 0, 1)
    assert np.array_equal(x, expected)


def test_grey_16bit_rgba_and_palette_inputs(tmp_path):
    grey16 = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 30).astype(np.uint16)
    rgb = to_rgb_255(grey16, Intensity())  # auto: min-max for a 2-D image
    assert rgb.shape == (64, 32, 3) and rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert read_scan(tmp_path / "g16.png").data.dtype == np.uint16
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 10
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert to_rgb_255(read_scan(tmp_path / "rgba.png").data)[0, 0].tolist() == [255, 0, 0]
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert read_scan(tmp_path / "pal.png").data[0, 1].tolist() == [10, 20, 30]
    with pytest.raises(InputError, match="unreadable or corrupt"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
        read_scan(tmp_path / "bad.png")
    with pytest.raises(InputError, match="does not exist"):
        read_scan(tmp_path / "missing.png")


def test_masks_and_boxes_map_into_the_frame():
    frame = frame_for(100, 200, Preprocessing())
    mask = np.zeros((100, 200), np.uint8)
    mask[10:20, 40:60] = 3
    m = resize_mask_to_frame(mask, frame)
    assert m.shape == (1024, 1024) and set(np.unique(m)) == {0, 3} and m[600:].max() == 0
    np.testing.assert_allclose(boxes_to_frame(np.array([[40, 10, 60, 20]]), frame), [[204.8, 51.2, 307.2, 102.4]],
                               rtol=SAME_LIBRARY * EPS32)  # one scaling, rounded once to float32


@pytest.mark.parametrize("n_in,n_out", [(256, 1024), (1024, 341), (256, 77), (7, 7)])
def test_bilinear_matrix_matches_torch(n_in, n_out):
    x = torch.randn(1, 1, n_in, 5)
    ref = F.interpolate(x, size=(n_out, 5), mode="bilinear", align_corners=False)[0, 0].numpy()
    got = bilinear_matrix(n_in, n_out) @ x[0, 0].numpy()
    # numpy against torch: each output is a 2-tap weighted sum (the matrix's zeros add exactly).
    np.testing.assert_allclose(got, ref, rtol=0, atol=f32_tol(peak(ref), n=2, k=CROSS_LIBRARY))


def test_logits_to_original_matches_sams_postprocess():
    low = torch.randn(3, 1, 256, 256) * 4
    for hw, resize in [((480, 640), "longest"), ((333, 1000), "longest"), ((300, 200), "stretch")]:
        frame = frame_for(*hw, Preprocessing(resize=resize))
        ref = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
        ref = ref[..., : frame.resized_hw[0], : frame.resized_hw[1]]
        ref = F.interpolate(ref, hw, mode="bilinear", align_corners=False)[:, 0].numpy()
        got = logits_to_original(low.numpy(), frame)
        assert got.shape == (3, *hw)
        # Each bilinear weight comes from a float32 source coordinate up to 256 (then 1024),
        # rounded by ≤ eps32/2 of it, which moves the value by that times the step between
        # the two source pixels; two resizes, numpy against torch (x and y: k = 2 each).
        steps = 256 * peak(np.diff(low.numpy(), axis=-1)) + 1024 * peak(np.diff(ref, axis=-1))
        np.testing.assert_allclose(got, ref, rtol=0, atol=SAME_LIBRARY * EPS32 / 2 * steps * 2)
        assert (masks_from_logits(low.numpy(), frame) == (ref > 0)).mean() > 0.999
    assert resize_bilinear(np.ones((2, 4, 4)), (8, 3)).shape == (2, 8, 3)
