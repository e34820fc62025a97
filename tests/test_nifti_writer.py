"""casam's .nii.gz masks are a function of the labels and the source's grid alone: the gzip
header carries no time of writing, so casam-infer's output and casam-label's download for
the same prompts are the same bytes (issue 23, "Save"), however far apart they are written."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from casam_io.readers import ReadOptions, read
from casam_io.writers.nifti import nifti_mask, write_nifti_mask

nib = pytest.importorskip("nibabel")


def test_two_writes_of_the_same_labels_are_byte_identical(tmp_path, monkeypatch):
    from nibabel.testing import data_path

    scan = read(Path(data_path) / "anatomical.nii", ReadOptions())
    labels = np.zeros(scan.data.shape[:3], dtype=np.uint8)
    labels[5:20, 8:30, 10:14] = 1
    clock = iter([1_000_000_000.0, 1_700_000_000.0])  # two writes "years apart": gzip would stamp each
    monkeypatch.setattr(time, "time", lambda: next(clock, 1_800_000_000.0))
    write_nifti_mask(tmp_path / "a.nii.gz", scan, labels)
    write_nifti_mask(tmp_path / "b.nii.gz", scan, labels)
    first, second = (tmp_path / "a.nii.gz").read_bytes(), (tmp_path / "b.nii.gz").read_bytes()
    assert first == second
    assert first[4:8] == b"\0\0\0\0"  # gzip MTIME: 0, "no time stamp" (RFC 1952)
    assert gzip.decompress(first) == nifti_mask(scan, labels).to_bytes()
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj), labels)
