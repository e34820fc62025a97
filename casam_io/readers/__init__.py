"""The reader registry: one row per file format, and every suffix question answered here.

Adding a format: write ``casam_io/readers/<format>.py`` with a ``Reader`` subclass and add
its instance to ``REGISTRY``. Suffix tuples, stems of output names, folder listings and the
dispatch of ``read_scan`` all derive from this table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from casam_core.errors import InputError
from casam_io.readers.base import DEFAULT_MAX_PIXELS, ReadOptions, Reader
from casam_io.readers.dicom import DicomFileReader, DicomSeriesReader
from casam_io.readers.nifti import NiftiReader
from casam_io.readers.picture import PictureReader
from casam_io.scan import Scan

REGISTRY: tuple[Reader, ...] = (PictureReader(), DicomFileReader(), NiftiReader(), DicomSeriesReader())
_BY_NAME = {r.name: r for r in REGISTRY}


def suffixes(*names: str) -> tuple[str, ...]:
    """The suffixes of the named readers (all readers when none is named), in table order."""
    rows = [_BY_NAME[n] for n in names] if names else list(REGISTRY)
    return tuple(s for r in rows for s in r.suffixes)


ALL_SUFFIXES = suffixes()


def split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name, with the longest registered suffix (``x.nii.gz`` →
    ``x``); a name without a registered suffix is all stem (``notes.txt`` stays whole)."""
    lower = name.lower()
    for suffix in sorted(ALL_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def stem_of(path: Union[str, "os.PathLike[str]"]) -> str:
    """The one stem rule casam uses for output names, masks and dataset pairing."""
    return split_suffix(Path(path).name)[0]


def reader_for(path: Path) -> Reader:
    """The reader of ``path``: a folder is a DICOM series; a file goes by its suffix, and an
    unknown suffix goes to Pillow, which names what it cannot read."""
    for reader in REGISTRY:
        if reader.claims(path):
            return reader
    return _BY_NAME["picture"]


def read(path: Union[str, "os.PathLike[str]"], options: ReadOptions = ReadOptions()) -> Scan:
    """Any supported file or series folder → Scan."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image {p} does not exist")
    return reader_for(p).read(p, options)


__all__ = ["DEFAULT_MAX_PIXELS", "REGISTRY", "ReadOptions", "Reader", "read", "reader_for", "split_suffix",
           "stem_of", "suffixes"]
