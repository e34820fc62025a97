"""Masks written on real medical files, checked by what did not write them.

The DICOM SEGs are written for real source series (pydicom's and nibabel's bundled scans,
read in place or through links to them) and checked by dciodvfy (Debian's dicom3tools),
an IOD validator that shares no code with pydicom or highdicom; the NIfTI masks of
nibabel's real ``anatomical.nii`` and ``example4d.nii.gz`` must carry the source's grid,
affine and qform/sform codes. The tiny test SAM is untrained, so ``--task identity`` with
``--min-area 1`` keeps whatever it segments: these tests are about the files, not the masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from casam_infer.cli import main
from casam_io.image_io import read_scan
from conftest import assert_valid_dicom, need


def infer(*args) -> dict:
    """casam-infer's JSON record of a run that must succeed."""
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def pydicom_ct_series() -> Path:
    """pydicom's real CT series (pcir.org, shrunk to 16×16): five slices, one folder, in place."""
    pydicom = need("pydicom")
    return Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def nibabel_mr_series(folder: Path) -> Path:
    """nibabel's two real MR slices (256×256, one series), linked into a folder of their own:
    the test-data folder beside them holds other series."""
    nib = need("nibabel", "train")
    source = Path(nib.__file__).parent / "nicom" / "tests" / "data"
    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        (folder / name).symlink_to(source / name)
    return folder


def check_seg(seg_path: Path, series: Path, mask_path: Path) -> None:
    """The SEG references every source slice, on its frame of reference and study, its
    frames are the NIfTI mask's slices, and dciodvfy finds no error in it."""
    hd, pydicom, nib = need("highdicom"), need("pydicom"), need("nibabel", "train")
    scan = read_scan(series)
    sources = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted(series.iterdir())]
    uids = [ds.SOPInstanceUID for ds in scan.datasets]
    assert sorted(uids) == sorted(ds.SOPInstanceUID for ds in sources)
    seg = hd.seg.segread(str(seg_path))
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(uids)
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == sources[0].PatientID
    labels = np.asarray(nib.load(str(mask_path)).dataobj)
    assert labels.shape == scan.data.shape and labels.any()
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)[..., 0]
    np.testing.assert_array_equal(frames.astype(bool), np.moveaxis(labels, -1, 0) == 1)
    assert_valid_dicom(seg_path)


def test_seg_on_pydicoms_real_ct_series(engines, tmp_path):
    series = pydicom_ct_series()
    record = infer(series, "--box3d", 2, 2, 0, 14, 14, 4, "--task", "identity", "--min-area", 1,
                   "--engines", engines, "--out", tmp_path / "out")
    assert record["outputs"]["seg"] == "CT5N_seg.dcm"
    check_seg(tmp_path / "out" / "CT5N_seg.dcm", series, tmp_path / "out" / "CT5N_mask.nii.gz")


def test_seg_on_nibabels_real_mr_slices(engines, tmp_path):
    series = nibabel_mr_series(tmp_path / "mr")
    record = infer(series, "--box3d", 60, 60, 0, 200, 200, 1, "--task", "identity", "--min-area", 1,
                   "--engines", engines, "--out", tmp_path / "out")
    assert record["outputs"]["seg"] == "mr_seg.dcm"
    check_seg(tmp_path / "out" / "mr_seg.dcm", series, tmp_path / "out" / "mr_mask.nii.gz")


@pytest.mark.parametrize("name, extra, box3d", [
    ("anatomical.nii", [], (4, 6, 11, 28, 34, 13)),
    ("example4d.nii.gz", ["--volume", 0], (20, 20, 11, 100, 80, 13)),
], ids=["anatomical", "example4d-volume0"])
def test_nifti_mask_of_nibabels_real_files_keeps_the_grid_and_codes(engines, tmp_path, name, extra, box3d):
    """The mask lies on the source's voxel grid (the 3-D grid of volume 0 of a 4-D file),
    with its affine and both its qform and sform, codes included (example4d's are oblique)."""
    nib = need("nibabel", "train")
    from nibabel.testing import data_path

    source_path = Path(data_path) / name
    record = infer(source_path, "--box3d", *box3d, *extra, "--task", "identity", "--min-area", 1,
                   "--engines", engines, "--out", tmp_path / "out")
    stem = name.split(".")[0]
    assert record["outputs"]["mask"] == f"{stem}_mask.nii.gz"
    source, mask = nib.load(str(source_path)), nib.load(str(tmp_path / "out" / f"{stem}_mask.nii.gz"))
    assert mask.shape == source.shape[:3] and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, source.affine)
    for get in ("get_qform", "get_sform"):
        (m_affine, m_code), (s_affine, s_code) = getattr(mask, get)(coded=True), getattr(source, get)(coded=True)
        assert m_code == s_code and int(s_code) > 0, (get, m_code, s_code)
        np.testing.assert_array_equal(m_affine, s_affine)
    labels = np.asarray(mask.dataobj)
    z0, z1 = box3d[2], box3d[5]
    assert labels[:, :, z0:z1 + 1].any() and not labels[:, :, :z0].any() and not labels[:, :, z1 + 1:].any()
