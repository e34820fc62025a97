"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) through nibabel (the ``medical`` extra)."""

from __future__ import annotations

from pathlib import Path

from casam_io.readers.base import ReadOptions, Reader
from casam_io.scan import Scan
from casam_io.volume_io import read_nifti


class NiftiReader(Reader):
    name = "nifti"
    kind = "volume"
    suffixes = (".nii", ".nii.gz")

    def read(self, path: Path, options: ReadOptions) -> Scan:
        return read_nifti(path, volume=options.volume, strict_4d=options.strict_4d)
