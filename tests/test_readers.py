"""casam_io.readers: one reader per format in one registry, and every suffix question
answered from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from casam_io import image_io
from casam_io.readers import REGISTRY, read, reader_for, split_suffix, stem_of, suffixes


def test_suffixes_are_unique_and_the_callers_tuples_derive_from_the_table() -> None:
    every = [s for r in REGISTRY for s in r.suffixes]
    assert len(every) == len(set(every))
    assert image_io.NIFTI_SUFFIXES == suffixes("nifti") and ".nii.gz" in image_io.NIFTI_SUFFIXES
    assert set(image_io.UNLABELLED_SUFFIXES) == set(every)


@pytest.mark.parametrize("name, stem", [("x.nii.gz", "x"), ("X.NII.GZ", "X"), ("a.b.png", "a.b"), ("s.dcm", "s"),
                                        ("notes.txt", "notes.txt"), (".png", ".png")])
def test_one_stem_rule(name: str, stem: str) -> None:
    assert stem_of(Path("dir") / name) == stem
    assert split_suffix(name)[0] == stem


def test_each_reader_reads_its_format(tmp_path: Path) -> None:
    nib_data = pytest.importorskip("nibabel.testing").data_path
    pydicom_data = pytest.importorskip("pydicom.data")
    png = tmp_path / "p.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(png)
    cases = {
        "picture": png,
        "nifti": Path(nib_data) / "anatomical.nii",
        "dicom": Path(pydicom_data.get_testdata_file("CT_small.dcm")),
        "dicom-series": Path(nib_data).parent.parent / "nicom" / "tests" / "data",
    }
    for name, path in cases.items():
        assert reader_for(path).name == name, path
    assert read(cases["picture"]).data.shape == (8, 8)
    assert read(cases["nifti"]).is_volume
    assert read(cases["dicom"]).data.ndim == 2
