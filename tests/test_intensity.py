"""One intensity pipeline: the trainer's slices and the runtime's are bit-identical, for a real
NIfTI scan and a DICOM series; DICOM rescale, VOI and MONOCHROME1; recorded settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from casam_core.errors import InputError
from casam_io.image_io import read_prepared, read_scan
from casam_io.intensity import INTENSITY_MODES, WINDOW_PRESETS, Intensity, intensity_from_options
from runtime.preprocess import Preprocessing
from conftest import need
from float32 import f32_tol, peak
from trainer.data import DataError, load_dataset
from volume_support import sphere_volume, write_dicom_series

MODES = [Intensity(), Intensity(mode="window", window=WINDOW_PRESETS["brain"]), Intensity(mode="minmax")]


def nifti_dataset(root: Path, source: Path, label: np.ndarray, affine: np.ndarray) -> Path:
    """images/<case>.nii (a link to the file, used in place) + labels/<case>.nii.gz."""
    nib = need("nibabel", "train")
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    os.symlink(source, root / "images" / source.name)
    stem = source.name.split(".")[0]
    nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / f"{stem}.nii.gz"))
    return root


def assert_trainer_equals_runtime(dataset, path: Path, intensity: Intensity, axis: int) -> int:
    """Every training slice equals casam-infer's single-slice read and its volume mode's slice."""
    prep = Preprocessing(intensity=intensity)
    streamed = prep.slices(read_scan(path), axis=axis)  # what VolumeSegmenter windows slices with
    for sample in dataset.samples:
        k = int(sample.stem.rsplit("_", 1)[1])
        trained = sample.image()
        assert trained.dtype == np.uint8
        assert np.array_equal(trained, read_prepared(path, intensity, index=k, axis=axis)[0])
        assert np.array_equal(trained, prep.read(path, index=k, axis=axis)[0])
        assert np.array_equal(trained, streamed(k))
    return len(dataset.samples)


@pytest.mark.parametrize("axis", [2, 0])
@pytest.mark.parametrize("intensity", MODES, ids=[m.mode for m in MODES])
def test_real_nifti_slices_are_bit_identical_in_training_and_inference(tmp_path, axis, intensity):
    nib = need("nibabel", "train")
    from nibabel.testing import data_path

    source = Path(data_path) / "anatomical.nii"
    image = nib.load(str(source))
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 12:30, 8:18] = 1
    root = nifti_dataset(tmp_path / "ds", source, label, image.affine)
    dataset = load_dataset(root, test_fraction=0.0, axis=axis, intensity=intensity)
    assert assert_trainer_equals_runtime(dataset, source, intensity, axis) == 10


def test_default_volume_window_is_the_trainers_percentile_window(tmp_path):
    """``auto`` on a volume is what the trainer always did, so older NIfTI bundles keep their
    intensities: 0.5–99.5 percentiles of the whole volume, float64, rounded."""
    nib = need("nibabel", "train")
    from nibabel.testing import data_path

    path = Path(data_path) / "anatomical.nii"
    volume = np.asarray(nib.load(str(path)).dataobj)
    lo, hi = np.percentile(volume, (0.5, 99.5))
    legacy = np.clip(np.rint((volume.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    for k in (3, 12, 20):
        assert np.array_equal(read_prepared(path, Intensity(), index=k)[0], legacy[:, :, k])


def series_dataset(root: Path, volume_hu: np.ndarray, label: np.ndarray, **series) -> tuple[Path, list[str]]:
    need("pydicom")  # the series is written with pydicom
    nib = need("nibabel", "train")
    uids = write_dicom_series(root / "images" / "case1", volume_hu, **series)
    (root / "labels").mkdir()
    affine = read_scan(root / "images" / "case1").affine
    nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / "case1.nii.gz"))
    return root, uids


@pytest.mark.parametrize("intensity", [Intensity(), Intensity(mode="window", window=WINDOW_PRESETS["bone"]),
                                       Intensity(mode="dicom-voi")], ids=["auto", "bone", "dicom-voi"])
def test_dicom_series_slices_are_bit_identical_in_training_and_inference(tmp_path, intensity):
    volume, label = sphere_volume((48, 40, 6), (20, 20, 3), radius_mm=10.0, spacing=(0.7, 0.8, 3.0))
    root, _ = series_dataset(tmp_path / "ds", volume.astype(np.float64), label, spacing=(0.7, 0.8, 3.0), slope=2.0,
                             intercept=-1024.0)
    dataset = load_dataset(root, test_fraction=0.0, intensity=intensity)
    assert dataset.kind == "dicom"
    assert assert_trainer_equals_runtime(dataset, root / "images" / "case1", intensity, 2) == int(label.any(axis=(0, 1)).sum())


def test_dicom_rescale_voi_and_monochrome1(tmp_path):
    need("pydicom")  # the series is written with pydicom
    volume, _ = sphere_volume((32, 40, 4), (16, 20, 2), radius_mm=8.0)
    hu = volume.astype(np.float64) * 2  # even values: exact after slope 2
    write_dicom_series(tmp_path / "m2", hu, slope=2.0, intercept=-1024.0, window=(40.0, 400.0))
    write_dicom_series(tmp_path / "m1", hu, slope=2.0, intercept=-1024.0, window=(40.0, 400.0), photometric="MONOCHROME1")
    scan = read_scan(tmp_path / "m2")
    assert scan.data.shape == (32, 40, 4) and scan.source.voi == (40.0, 400.0)
    np.testing.assert_array_equal(scan.data, hu)  # RescaleSlope/Intercept applied, slices sorted by position
    voi = read_prepared(tmp_path / "m2", Intensity(mode="dicom-voi"), index=2)[0]
    fixed = read_prepared(tmp_path / "m2", Intensity(mode="window", window=(40.0, 400.0)), index=2)[0]
    auto = read_prepared(tmp_path / "m2", Intensity(), index=2)[0]
    assert np.array_equal(voi, fixed) and not np.array_equal(voi, auto)
    inverted = read_prepared(tmp_path / "m1", Intensity(mode="dicom-voi"), index=2)[0]
    assert np.array_equal(inverted, 255 - voi)


def test_dicom_series_voi_window_is_its_middle_slices(tmp_path):
    """A series' own VOI window (``dicom-voi``) is its middle slice's, as a multi-frame file's
    is: the first and last slices of a series are often windowed on air."""
    pydicom = need("pydicom")
    volume, _ = sphere_volume((32, 40, 5), (16, 20, 2), radius_mm=8.0)
    write_dicom_series(tmp_path / "s", volume.astype(np.float64), window=(40.0, 400.0))
    for path in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(str(path))
        if int(ds.InstanceNumber) in (1, 5):  # the first and last slices along the normal
            ds.WindowCenter, ds.WindowWidth = "-600", "1500"
            ds.save_as(str(path))
    assert read_scan(tmp_path / "s").source.voi == (40.0, 400.0)
    voi = read_prepared(tmp_path / "s", Intensity(mode="dicom-voi"), index=2)[0]
    fixed = read_prepared(tmp_path / "s", Intensity(mode="window", window=(40.0, 400.0)), index=2)[0]
    assert np.array_equal(voi, fixed)


def test_real_dicom_file_from_nibabel():
    pydicom = need("pydicom")
    nibabel = need("nibabel", "train")

    path = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "decimal_rescale.dcm"
    ds = pydicom.dcmread(str(path))
    scan = read_scan(path)
    expected = ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    assert float(ds.RescaleSlope) != 1.0
    np.testing.assert_array_equal(scan.data, expected)
    assert scan.source.kind == "image" and scan.source.voi == (float(ds.WindowCenter), float(ds.WindowWidth))
    image, warnings = read_prepared(path, Intensity(mode="dicom-voi"))
    assert image.shape == ds.pixel_array.shape and image.dtype == np.uint8 and not warnings


def test_real_monochrome1_file_from_pydicom_is_inverted(tmp_path):
    """pydicom ships real computed radiographs stored MONOCHROME1 (pcir.org images, shrunk to
    16×16): low values are bright. The file is linked, not copied, under a .dcm name
    (its own has no suffix). Prepared, it is the rescaled pixels under its VOI window (or
    min-max), turned over: its highest value shows black and its lowest white."""
    pydicom = need("pydicom")
    source = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CR1" / "6154"
    ds = pydicom.dcmread(str(source))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) != 1.0
    (tmp_path / "cr.dcm").symlink_to(source)
    raw = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    scan = read_scan(tmp_path / "cr.dcm")
    assert scan.source.kind == "image" and scan.source.invert
    # float32 arithmetic (stored × slope + intercept): two roundings at the magnitude of the values
    np.testing.assert_allclose(scan.data, raw, rtol=0, atol=f32_tol(peak(raw), n=2))
    values = scan.data.astype(np.float64)  # the window maps these (float64), so the expected bytes are exact
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert scan.source.voi == (center, width)
    for intensity, (lo, hi) in ((Intensity(mode="dicom-voi"), (center - width / 2, center + width / 2)),
                                (Intensity(mode="minmax"), (values.min(), values.max()))):
        shown = np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        image = read_prepared(tmp_path / "cr.dcm", intensity)[0]
        assert np.array_equal(image, 255 - shown), intensity.mode
    image = read_prepared(tmp_path / "cr.dcm", Intensity(mode="minmax"))[0]
    assert image.flat[raw.argmax()] == 0 and image.flat[raw.argmin()] == 255


def test_label_geometry_and_split_by_case(tmp_path):
    nib = need("nibabel", "train")
    volume, label = sphere_volume((32, 32, 8), (16, 16, 4), radius_mm=7.0)
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for case in ("a", "b", "c", "d", "e"):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / "images" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labels" / f"{case}.nii.gz"))
    dataset = load_dataset(root, seed=1)
    record = dataset.split_record()
    train_cases, test_cases = set(record["cases"]["train"]), set(record["cases"]["test"])
    assert test_cases and not train_cases & test_cases and len(train_cases | test_cases) == 5
    assert {s.case for s in dataset.test} == test_cases and {s.case for s in dataset.train} == train_cases
    assert record["intensity"] == Intensity().to_dict()
    shifted = np.eye(4)
    shifted[0, 3] = 0.5  # half a voxel: a label on another grid
    nib.save(nib.Nifti1Image(label, shifted), str(root / "labels" / "c.nii.gz"))
    nib.save(nib.Nifti1Image(label[:, :, :7], np.eye(4)), str(root / "labels" / "d.nii.gz"))
    with pytest.raises(DataError) as info:
        load_dataset(root)
    assert "case c: label volume's affine differs" in str(info.value)
    assert "case d: label volume is (32, 32, 7)" in str(info.value)


def test_recorded_intensity_round_trips_and_old_records_read_as_auto():
    old = {"resize": "longest", "size": 1024, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    assert Preprocessing.from_dict(old) == Preprocessing() and Preprocessing.from_dict(old).intensity.mode == "auto"
    prep = Preprocessing(intensity=Intensity(mode="window", window=(40.0, 400.0)))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert prep.to_dict()["intensity"] == {"mode": "window", "percentiles": [0.5, 99.5], "window": [40.0, 400.0]}
    assert intensity_from_options(None, None, "lung") == Intensity(mode="window", window=(-600.0, 1500.0))
    assert intensity_from_options(None, (50.0, 350.0), None) == Intensity(mode="window", window=(50.0, 350.0))
    assert intensity_from_options("percentile", None, None) == Intensity(mode="percentile")
    assert intensity_from_options(None, None, None) is None
    for bad in (lambda: Intensity(mode="gamma"), lambda: Intensity(mode="window"),
                lambda: Intensity(mode="window", window=(40.0, 0.0)), lambda: intensity_from_options("minmax", (1.0, 2.0), None)):
        with pytest.raises(InputError):
            bad()


def test_cli_choices_come_from_the_tables():
    from click.testing import CliRunner

    from trainer.cli import main

    text = CliRunner().invoke(main, ["--help"]).output
    assert all(name in text for name in list(WINDOW_PRESETS) + list(INTENSITY_MODES))


def test_pictures_keep_todays_min_max(tmp_path):
    """2-D files read as before: 8-bit kept, 16-bit min-max scaled (the formula pinned here)."""
    grey16 = (np.random.default_rng(2).random((30, 40)) * 50000 + 3000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    rgb = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    lo, hi = float(grey16.min()), float(grey16.max())
    legacy = np.clip(np.rint((grey16.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    for intensity in (Intensity(), Intensity(mode="window", window=(40.0, 400.0))):  # pictures are never HU-windowed
        assert np.array_equal(read_prepared(tmp_path / "g16.png", intensity)[0], legacy)
        assert np.array_equal(read_prepared(tmp_path / "rgb.png", intensity)[0], rgb)
