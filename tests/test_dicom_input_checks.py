"""DICOM inputs that are the hospital's, not casam's, problem: a duplicated slice is refused
in one line (even with --allow-gaps), and the libraries' complaints about a source file's
own metadata become one casam warning per file (docs/MEDICAL.md)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from click.testing import CliRunner  # noqa: E402

from casam_core.errors import InputError  # noqa: E402
from casam_io.image_io import read_scan  # noqa: E402
from casam_io.volume_io import SourceMetadataWarning  # noqa: E402
from runtime_support import exported, one_error_line  # noqa: E402

NICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


def series(folder: Path, *names: tuple[str, str]) -> Path:
    """A series folder of nibabel's two-slice test series (PatientName 'dft patient name')."""
    folder.mkdir()
    for source, name in names:
        shutil.copy(NICOM / source, folder / name)
    return folder


def test_a_duplicated_slice_is_refused_even_with_allow_gaps(tmp_path):
    folder = series(tmp_path / "dup", ("0.dcm", "0.dcm"), ("0.dcm", "0b.dcm"), ("1.dcm", "1.dcm"))
    for allow_gaps in (False, True):
        with pytest.raises(InputError, match=r"0\.dcm and 0b\.dcm lie at one slice position .*--allow-gaps does not"):
            read_scan(folder, allow_gaps=allow_gaps)
    ok = read_scan(series(tmp_path / "ok", ("0.dcm", "0.dcm"), ("1.dcm", "1.dcm")), allow_gaps=True)
    assert ok.data.shape[2] == 2


def test_casam_infer_refuses_a_duplicated_slice_in_one_line(tmp_path, tmp_path_factory):
    from casam_infer.cli import main

    folder = series(tmp_path / "dup", ("0.dcm", "0.dcm"), ("0.dcm", "0b.dcm"), ("1.dcm", "1.dcm"))
    engines = exported(tmp_path_factory)[1]
    result = CliRunner().invoke(main, [str(folder), "--allow-gaps", "--box", "10", "10", "60", "60", "--engines",
                                       str(engines), "--backend", "ort-cpu", "--out", str(tmp_path / "o")])
    assert "0.dcm and 0b.dcm lie at one slice position" in one_error_line(result)
    assert not any((tmp_path / "o").glob("*mask*"))


def test_source_metadata_complaints_become_one_warning_and_verbatim_names_none(tmp_path):
    from casam_io.writers.seg import dicom_seg

    folder = tmp_path / "s"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while the bad values are written
        for name in ("0.dcm", "1.dcm"):
            ds = pydicom.dcmread(NICOM / name)
            ds.StudyID = "x" * 40  # SH holds 16 characters
            ds.save_as(folder / name)
    scan = read_scan(folder, allow_gaps=True)
    labels = np.zeros(scan.data.shape, np.uint8)
    labels[10:20, 10:20, :] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dicom_seg(scan, labels, {1: "x"}) is not None
    texts = [str(w.message) for w in caught]
    assert not any("person name" in t for t in texts), texts  # 'dft patient name' is copied verbatim
    ours = [w for w in caught if issubclass(w.category, SourceMetadataWarning)]
    assert len(ours) == 1 and len(caught) == 1, texts
    assert "maximum length of 16" in texts[0] and str(folder) in texts[0]
