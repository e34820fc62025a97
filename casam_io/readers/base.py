"""What every file-format reader is: suffixes, a kind, and ``read(path, options) -> Scan``.

The registry (``casam_io.readers``) holds one instance per format. Everything that needs
to know which files casam reads (folder listings, stems of output files, mask look-ups,
input expansion) asks the registry, so a new format is one module and one registry row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from casam_io.scan import Scan

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: a 10000×10000 slide tile, 1.2 GB as 12-bit RGB


@dataclass(frozen=True)
class ReadOptions:
    """How a file is read: ``volume`` picks one volume of a 4-D NIfTI (without it a 4-D file
    uses volume 0 with a warning, or is refused when ``strict_4d``); ``max_pixels`` refuses
    larger pictures from their header; ``allow_gaps`` accepts a DICOM series with missing
    slices."""

    volume: Optional[int] = None
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    allow_gaps: bool = False
    strict_4d: bool = False


class Reader:
    """One file format. ``kind`` is "picture" (one 2-D image per file) or "volume"."""

    name: ClassVar[str]
    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()  # lower case, longest match wins; () for folders
    reads_folders: ClassVar[bool] = False

    def claims(self, path: Path) -> bool:
        """True when this reader reads ``path`` (by suffix, or a folder for series readers)."""
        if path.is_dir():
            return self.reads_folders
        return path.name.lower().endswith(self.suffixes)

    def read(self, path: Path, options: ReadOptions) -> Scan:
        raise NotImplementedError
