"""Reader limits and warnings: the pixel limit (no decompression-bomb traceback), bounded
memory below it, NaN pixels and 4-D NIfTI files reported once instead of silently changed."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_infer.cli import main
from casam_core.errors import InputError
from casam_io.image_io import DEFAULT_MAX_PIXELS, read_pil, read_prepared
from casam_io.intensity import CHUNK_ELEMENTS, Intensity, Source, to_uint8
from runtime_support import one_error_line


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_huge_png_exits_2_before_decoding(engines, tmp_path):
    # 400 Mpx: Pillow's own DecompressionBombError fires at 179 Mpx; 1-bit keeps the file small
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    result = invoke(tmp_path / "bomb.png", "--box", 1, 1, 9, 9, "--engines", engines, "--out", tmp_path / "out")
    assert one_error_line(result) == (f"casam-infer: error: {tmp_path / 'bomb.png'}: image 20000×20000 exceeds the "
                                     f"{DEFAULT_MAX_PIXELS}-pixel limit (--max-pixels)")
    Image.new("L", (11, 10)).save(tmp_path / "small.png")
    result = invoke(tmp_path / "small.png", "--box", 1, 1, 9, 9, "--engines", engines, "--max-pixels", 100,
                    "--out", tmp_path / "out")
    assert "image 11×10 exceeds the 100-pixel limit (--max-pixels)" in one_error_line(result)
    assert read_pil(tmp_path / "small.png", max_pixels=110).shape == (10, 11)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is lifted for the header read only


@pytest.mark.parametrize("chunk", [CHUNK_ELEMENTS, 1 << 18])
def test_scaling_a_large_16bit_image_holds_no_full_size_copy(monkeypatch, chunk):
    """The output (1 byte a pixel) and chunk-sized temporaries, nothing of the image's size.

    With the shipped chunk (4 Mi elements, 32 MB of float64) on 16 Mpx the bound would still
    pass a full float32 copy (64 MB), so the same code also runs with 256 Ki-element chunks:
    there the bound (16 MB + 6 MB) fails any full-size temporary, even one byte a pixel.
    """
    import casam_io.intensity

    monkeypatch.setattr(casam_io.intensity, "CHUNK_ELEMENTS", chunk)
    image = np.random.default_rng(0).integers(0, 60000, (4000, 4000), dtype=np.uint16)  # 16 Mpx
    tracemalloc.start()
    try:
        out, _ = to_uint8(image, Intensity(mode="minmax"), Source(kind="image"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    lo, hi = int(image.min()), int(image.max())
    assert out.dtype == np.uint8 and out.max() == 255 and out.flat[image.argmax()] == 255 and out.flat[image.argmin()] == 0
    assert np.array_equal(out[:2], np.clip(np.rint((image[:2] - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8))
    # The output plus a float64 chunk, its NaN mask and its bytes (10 bytes an element), with room.
    bound = image.size + 3 * chunk * 8
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    if chunk < CHUNK_ELEMENTS:
        assert bound < 2 * image.size  # any full-size temporary breaks it


def test_nan_pixels_warn_once_per_image(engines, tmp_path):
    data = np.random.default_rng(1).random((40, 50)).astype(np.float32)
    data[5:9, 5:9] = np.nan
    Image.fromarray(data, mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(data, mode="F").save(tmp_path / "nan2.tif")
    image, warnings = read_prepared(tmp_path / "nan.tif")
    assert warnings == ["16 NaN or infinite pixel(s) shown as black"]
    assert (image[5:9, 5:9] == 0).all() and image.max() == 255
    result = invoke(tmp_path, "--box", 1, 1, 30, 30, "--engines", engines, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "NaN" in line]
    assert lines == [f"casam-infer: warning: {name}: 16 NaN or infinite pixel(s) shown as black"
                     for name in ("nan.tif", "nan2.tif")]
    from runtime.pipeline import Pipeline
    from runtime.prompts import Prompts

    direct = Pipeline.from_manifest(engines, backend="ort-cpu").predict(data, Prompts.for_image(data.shape, boxes=np.array([[1, 1, 30, 30]], np.float32)))
    assert direct.warnings == ["16 NaN or infinite pixel(s) shown as black"]  # the API warns too


def test_4d_nifti_warns_and_offers_volume(engines, tmp_path):
    from nibabel.testing import data_path

    path = Path(data_path) / "example4d.nii.gz"
    first, warnings = read_prepared(path)
    assert len(warnings) == 1 and "4-D NIfTI with 2 volumes" in warnings[0] and "--volume K" in warnings[0]
    second, none = read_prepared(path, volume=1)
    assert not none and not np.array_equal(first, second)
    with pytest.raises(InputError, match="outside"):
        read_prepared(path, volume=2)
    result = invoke(path, "--single-slice", "--box", 1, 1, 30, 30, "--engines", engines, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "4-D NIfTI with 2 volumes: using volume 0; choose another with --volume K" in result.stderr
