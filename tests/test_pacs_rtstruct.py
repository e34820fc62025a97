"""casam's RT Structure Set writer (casam_io/writers/rtstruct.py): contours along pixel edges
that give back the mask bit for bit under the even-odd rule, an object dciodvfy accepts, and
references to the series it was drawn on."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from conftest import assert_valid_dicom, need

RTSTRUCT_IOD = "RTStructureSet"


def rasterise(loops: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill at pixel centres of pixel-corner loops, independent of the writer: a ray
    from each centre towards −column crosses the loops' vertical edges left of it."""
    inside = np.zeros(shape, bool)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    for loop in loops:
        for (r0, c0), (r1, c1) in zip(loop, np.roll(loop, -1, axis=0)):
            if c0 == c1 and r0 != r1:  # a vertical edge at column corner c0, rows r0..r1
                low, high = min(r0, r1), max(r0, r1)
                inside ^= (rows + 0.5 > low) & (rows + 0.5 < high) & (cols + 0.5 > c0)
    return inside


def test_boundary_loops_restore_the_mask_bit_for_bit():
    from casam_io.writers.rtstruct import boundary_loops

    rng = np.random.default_rng(0)
    masks = [rng.random((23, 31)) < p for p in (0.2, 0.5, 0.8)]
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10], ring[4:8, 4:8], ring[5, 5] = True, False, True  # a hole holding an island
    diagonal = np.eye(6, dtype=bool)  # pixels touching only at corners
    for mask in [*masks, ring, diagonal, np.ones((5, 7), bool), np.zeros((4, 4), bool)]:
        loops = boundary_loops(mask)
        np.testing.assert_array_equal(rasterise(loops, mask.shape), mask)
    assert len(boundary_loops(ring)) == 3  # outer boundary, hole, island
    assert [len(loop) for loop in boundary_loops(np.ones((5, 7), bool))] == [4]  # collinear corners dropped


def test_rtstruct_of_a_series_passes_dciodvfy_and_references_it(tmp_path):
    pydicom, nibabel = need("pydicom"), need("nibabel")
    from casam_io.image_io import read_scan
    from casam_io.writers.rtstruct import write_rtstruct

    nicom = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    folder = tmp_path / "series"
    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(nicom / name, folder / name)
    scan = read_scan(folder)
    labels = np.zeros(scan.data.shape, np.uint8)
    labels[40:90, 60:120, 0] = 1
    labels[50:70, 70:100, 1], labels[55:60, 80:90, 1] = 1, 0
    labels[150:160, 150:170, :] = 2
    assert write_rtstruct(tmp_path / "s_rtstruct.dcm", scan, labels, {1: "liver", 2: "x"}, "CA-SAM beta (casam 0.1.0)")
    assert_valid_dicom(tmp_path / "s_rtstruct.dcm", iod=RTSTRUCT_IOD)
    ds = pydicom.dcmread(str(tmp_path / "s_rtstruct.dcm"))
    sources = [d.SOPInstanceUID for d in scan.datasets]
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == scan.datasets[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == sources
    assert ds.StudyInstanceUID == scan.datasets[0].StudyInstanceUID and ds.Modality == "RTSTRUCT"
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "x"]
    first = ds.ROIContourSequence[0].ContourSequence
    assert len(first) == 3  # slice 0's rectangle; slice 1's rectangle and its hole
    assert {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in first} == set(sources)
    # Back to pixels: the contour points lie on the plane of their image, at pixel corners.
    ref = scan.datasets[0]
    points = np.asarray(first[0].ContourData, float).reshape(-1, 3) - np.asarray(ref.ImagePositionPatient, float)
    iop = np.asarray(ref.ImageOrientationPatient, float)
    spacing = np.asarray(ref.PixelSpacing, float)
    cols, rows = points @ iop[:3] / spacing[1] + 0.5, points @ iop[3:] / spacing[0] + 0.5
    np.testing.assert_allclose(np.c_[rows, cols], np.round(np.c_[rows, cols]), atol=1e-3)  # DS keeps ≥ 4 decimals
    corners = np.round(np.c_[rows, cols]).astype(int)
    np.testing.assert_array_equal(rasterise([corners], labels.shape[:2]), labels[:, :, 0] == 1)


def test_casam_infer_rtstruct_writes_one_beside_the_seg(engines, tmp_path):
    nibabel = need("nibabel")
    from click.testing import CliRunner

    from casam_infer.cli import main

    nicom = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    folder = tmp_path / "series"
    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(nicom / name, folder / name)
    ran = CliRunner().invoke(main, [str(folder), "--box", "10", "10", "60", "60", "--slice", "0", "--rtstruct",
                                    "--engines", str(engines), "--backend", "ort-cpu", "--out", str(tmp_path / "o")])
    assert ran.exit_code == 0, ran.output
    import json

    record = json.loads((tmp_path / "o" / "series.json").read_text())
    assert record["outputs"]["rtstruct"] == "series_rtstruct.dcm" and record["outputs"]["seg"] == "series_seg.dcm"
    assert_valid_dicom(tmp_path / "o" / "series_rtstruct.dcm", iod=RTSTRUCT_IOD)
    pydicom = need("pydicom")
    ds = pydicom.dcmread(str(tmp_path / "o" / "series_rtstruct.dcm"))
    assert ds.SeriesDescription == f"CA-SAM {record['route']} (casam 0.1.0)"
    # the label volume, back from the contours slice by slice, is the NIfTI mask
    labels = np.asarray(nibabel.load(tmp_path / "o" / "series_mask.nii.gz").dataobj)
    scan_uids = [c.ReferencedSOPInstanceUID for c in ds.ReferencedFrameOfReferenceSequence[0]
                 .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence]
    from casam_io.writers.rtstruct import boundary_loops

    for k in range(labels.shape[2]):
        mask = labels[:, :, k] == 1
        contours = [c for c in ds.ROIContourSequence[0].ContourSequence
                    if c.ContourImageSequence[0].ReferencedSOPInstanceUID == scan_uids[k]]
        assert len(contours) == len(boundary_loops(mask))
