"""Multi-frame DICOM files read as volumes: a real enhanced MR file from nibabel's test data,
and synthetic enhanced and legacy CT files with known voxels, rescale and geometry."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest

from casam_core.errors import InputError
from casam_io.image_io import IMAGE_SUFFIXES, prepare, read_prepared, read_scan
from casam_io.intensity import Intensity
from casam_io.volume_io import LPS_TO_RAS, is_dicom_series
from conftest import missing, need
from volume_support import sphere_volume, write_dicom_series, write_multiframe_dicom

SPACING = (0.7, 0.8, 3.0)
# Slice k of the synthetic volume sits in frame FRAME_ORDER.index(k): a reader must sort.
FRAME_ORDER = [3, 0, 5, 1, 4, 2]
SLOPES = [1.0, 2.0, 1.0, 0.5, 1.0, 4.0]
INTERCEPTS = [-1024.0, -2000.0, -1024.0, -500.0, 0.0, -3000.0]


def philips_mprage(tmp_path: Path) -> Path:
    """nibabel's real enhanced MR file (Philips MPRAGE, 176 sagittal frames), read in place
    and unzipped into the test's own temporary folder: casam reads .dcm, not .dcm.gz."""
    nib = need("nibabel", "train")
    source = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    if not source.is_file():
        missing(f"{source} is not installed")
    path = tmp_path / "philips_mprage.dcm"
    path.write_bytes(gzip.decompress(source.read_bytes()))
    return path


def stored_hu(volume: np.ndarray, slopes: list[float], intercepts: list[float]) -> np.ndarray:
    """The HU a reader recovers from int16 stored values: stored = rint((HU − b) / m), read
    back as float32(stored) × float32(m) + float32(b), the float32 arithmetic the reader
    (and a scanner's own software) uses."""
    m = np.asarray(slopes, np.float32)
    b = np.asarray(intercepts, np.float32)
    stored = np.rint((volume.astype(np.float64) - np.asarray(intercepts)) / np.asarray(slopes)).astype(np.int16)
    return stored.astype(np.float32) * m + b


def test_real_enhanced_mr_frames_are_slices_with_per_frame_rescale_and_geometry(tmp_path):
    pydicom = need("pydicom")
    path = philips_mprage(tmp_path)
    ds = pydicom.dcmread(str(path))
    assert int(ds.NumberOfFrames) == 176 and "RescaleSlope" not in ds  # rescale and geometry only per frame
    scan = read_scan(path)
    assert scan.is_volume and scan.data.shape == (256, 256, 176) and scan.warnings == []
    # Per-frame RescaleSlope 2.1079…: applied, so the voxels are float32 (the stored ones are
    # uint16). This file's pixel data are all zero, so the values themselves cannot tell.
    slope = float(ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope)
    assert slope != 1.0 and scan.data.dtype == np.float32
    np.testing.assert_array_equal(scan.data, np.moveaxis(ds.pixel_array, 0, -1).astype(np.float32) * np.float32(slope))
    # Each slice lies on its frame's ImagePositionPatient (RAS). The frames' positions depart
    # from even spacing by under 1e-5 mm (the scanner's rounding), far inside 1e-4 mm.
    positions = np.asarray([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                            for f in ds.PerFrameFunctionalGroupsSequence])
    voxels = np.stack([np.zeros(176), np.zeros(176), np.arange(176), np.ones(176)])
    np.testing.assert_allclose((scan.affine @ voxels)[:3].T, (LPS_TO_RAS[:3, :3] @ positions.T).T, atol=1e-4)
    # nibabel's own reader agrees on the grid; it stacks the frames the other way round.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM readers experimental on import
        from nibabel.nicom.dicomwrappers import wrapper_from_data

        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = 175
        theirs = LPS_TO_RAS @ wrapper_from_data(ds).affine @ flip
    # nibabel scales the unit slice normal by the slice spacing, casam takes the mean step
    # from the first to the last frame: under 1e-5 mm apart per frame, so under 2e-3 mm
    # over the 175 steps that move nibabel's origin to casam's.
    np.testing.assert_allclose(scan.affine, theirs, atol=2e-3)
    # its VOI window is the middle slice's (per-frame windows; the edge frames' show air)
    middle = ds.PerFrameFunctionalGroupsSequence[88].FrameVOILUTSequence[0]
    assert scan.source.voi == (float(middle.WindowCenter), float(middle.WindowWidth))


def test_synthetic_enhanced_ct_reads_as_the_same_series_written_file_by_file(tmp_path):
    need("pydicom")  # the files are written with pydicom
    volume, _ = sphere_volume((40, 36, 6), (20, 18, 3), radius_mm=6.0, spacing=SPACING)
    path = tmp_path / "ct.dcm"
    write_multiframe_dicom(path, volume, SPACING, SLOPES, INTERCEPTS, frame_order=FRAME_ORDER)
    scan = read_scan(path)
    assert scan.is_volume and scan.data.shape == (40, 36, 6) and scan.data.dtype == np.float32
    np.testing.assert_array_equal(scan.data, stored_hu(volume, SLOPES, INTERCEPTS))  # sorted, rescaled per frame
    # The same slices as a series of single files: the same voxels and the same grid.
    write_dicom_series(tmp_path / "series", stored_hu(volume, SLOPES, INTERCEPTS).astype(np.float64), SPACING,
                       slope=1.0, intercept=0.0)
    series = read_scan(tmp_path / "series")
    np.testing.assert_array_equal(scan.data, series.data)
    np.testing.assert_array_equal(scan.affine, series.affine)  # same decimal strings, same arithmetic
    assert scan.source == series.source  # VOI (40, 400) from the shared FrameVOILUTSequence
    for intensity in (Intensity(), Intensity(mode="dicom-voi"), Intensity(mode="window", window=(40.0, 400.0))):
        assert np.array_equal(prepare(scan, intensity)[0], prepare(series, intensity)[0])
    # a folder holding just this file (a scanner's export) is one volume: the file
    (tmp_path / "export").mkdir()
    path.rename(tmp_path / "export" / "IM0001")
    assert is_dicom_series(tmp_path / "export", IMAGE_SUFFIXES)
    np.testing.assert_array_equal(read_scan(tmp_path / "export").data, scan.data)


def test_legacy_multiframe_monochrome1_is_inverted_and_placed(tmp_path):
    need("pydicom")  # the files are written with pydicom
    volume, _ = sphere_volume((32, 30, 5), (16, 15, 2), radius_mm=6.0, spacing=SPACING)
    path = tmp_path / "legacy.dcm"
    write_multiframe_dicom(path, volume, SPACING, [1.0], [-1024.0], photometric="MONOCHROME1", enhanced=False)
    write_dicom_series(tmp_path / "series", volume.astype(np.float64), SPACING, photometric="MONOCHROME1")
    scan, series = read_scan(path), read_scan(tmp_path / "series")
    np.testing.assert_array_equal(scan.data, stored_hu(volume, [1.0], [-1024.0]))
    assert scan.source.invert and scan.source == series.source
    # SpacingBetweenSlices steps along the normal: the series' grid, to float64 rounding of
    # positions near 100 mm (its files' positions are decimal strings of 4 places: 1e-4 mm)
    np.testing.assert_allclose(scan.affine, series.affine, atol=1e-4)
    dark = read_prepared(path, Intensity(mode="window", window=(40.0, 400.0)), index=2)[0]
    normal = read_prepared(tmp_path / "series", Intensity(mode="window", window=(40.0, 400.0)), index=2)[0]
    assert np.array_equal(dark, normal) and dark[16, 15] < dark[0, 0]  # MONOCHROME1: the bright sphere shows dark


def test_enhanced_frames_with_a_gap_or_two_orientations_are_refused(tmp_path):
    pydicom = need("pydicom")
    volume, _ = sphere_volume((24, 24, 5), (12, 12, 2), radius_mm=5.0, spacing=SPACING)
    path = tmp_path / "gap.dcm"
    write_multiframe_dicom(path, volume, SPACING)
    ds = pydicom.dcmread(str(path))
    position = ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0]
    position.ImagePositionPatient = [float(v) + 6.0 * n for v, n in zip(position.ImagePositionPatient, [0, 0.28, 0.96])]
    ds.save_as(str(path))
    with pytest.raises(InputError, match="DICOM multi-frame file .*gap.dcm has uneven slice positions"):
        read_scan(path)
    allowed = read_scan(path, allow_gaps=True)  # casam-infer --allow-gaps: read, with a warning
    assert allowed.data.shape == (24, 24, 5) and any("uneven slice positions" in w for w in allowed.warnings)
    ds = pydicom.dcmread(str(path))
    ds.PerFrameFunctionalGroupsSequence[1].PlaneOrientationSequence = pydicom.Sequence(
        [pydicom.Dataset()])
    ds.PerFrameFunctionalGroupsSequence[1].PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(str(path))
    with pytest.raises(InputError, match="frame 2 has orientation"):
        read_scan(path)
