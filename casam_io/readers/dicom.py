"""DICOM through pydicom (the ``medical`` extra): one file (a slice or a multi-frame
volume), or a folder holding one series."""

from __future__ import annotations

from pathlib import Path

from casam_io.readers.base import ReadOptions, Reader
from casam_io.scan import Scan
from casam_io.volume_io import read_dicom_file, read_dicom_series


class DicomFileReader(Reader):
    name = "dicom"
    kind = "picture"  # one file; a multi-frame file reads as a volume
    suffixes = (".dcm", ".dicom")

    def read(self, path: Path, options: ReadOptions) -> Scan:
        return read_dicom_file(path, max_pixels=options.max_pixels, allow_gaps=options.allow_gaps)


class DicomSeriesReader(Reader):
    name = "dicom-series"
    kind = "volume"
    reads_folders = True

    def read(self, path: Path, options: ReadOptions) -> Scan:
        return read_dicom_series(path, max_pixels=options.max_pixels, allow_gaps=options.allow_gaps)
