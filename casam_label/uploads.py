"""An upload → a ``Scan``, through the reader registry, in a private temporary folder.

What a client may upload to open a session: one file (PNG, JPEG, TIFF, NIfTI, .nii.gz, a
DICOM file), several DICOM files of one series, or one zip of a series. Everything here is
untrusted, so it is checked before and while it is read:

- sizes are counted while the bytes are copied, and the copy stops as soon as the total
  passes ``max_bytes`` (413), whatever a header claimed;
- the number of files (parts, or zip members) is capped;
- client file names never become paths: the files are stored under names this module
  makes up, and a name with a folder part, ``..``, or an absolute path is refused;
- a zip is refused for members that are symlinks, encrypted, or named outside the folder,
  and for zip bombs: the members' declared sizes must fit ``max_unpacked_bytes``, and the
  bytes actually inflated are counted against each member's declared size;
- a wrong type or a truncated file is whatever the reader refuses, as one line (400).

The folder is removed at once when the scan holds its voxels in memory, or else (a
memory-mapped NIfTI) by the session's ``SessionSource.release`` when the session ends.
"""

from __future__ import annotations

import mmap
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

import numpy as np

from casam_core.errors import InputError
from casam_io.readers import ReadOptions, read, split_suffix
from casam_io.scan import Scan

CHUNK = 1 << 20
ZIP_SUFFIX = ".zip"
_DRIVE = re.compile(r"^[A-Za-z]:")


class UploadTooLarge(InputError):
    """The upload passed ``--max-upload-mb`` (HTTP 413)."""

    status = 413


@dataclass(frozen=True)
class UploadLimits:
    """``max_bytes``: all files of one upload together; ``max_files``: parts or zip members;
    ``max_unpacked_bytes``: a zip's contents once inflated."""

    max_bytes: int
    max_files: int = 4096
    max_unpacked_bytes: int = 0  # 0: four times max_bytes

    @property
    def unpacked(self) -> int:
        return self.max_unpacked_bytes or 4 * self.max_bytes


def check_name(name: str, what: str = "upload") -> str:
    """A client's file name, refused when it could name a path: empty, a folder part
    (``/`` or ``\\``), ``..``, absolute, a drive letter, control characters."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise InputError(f"{what} needs a file name of 1 to 255 characters")
    if "/" in name or "\\" in name or name in (".", "..") or _DRIVE.match(name) or \
            any(ord(c) < 32 for c in name):
        raise InputError(f"{what} name {name!r} is not a plain file name (no folders, '..', or absolute paths)")
    return name


def _copy(src: BinaryIO, dest: Path, budget: list[int], limit: int, what: str) -> int:
    """Copy ``src`` into ``dest`` chunk by chunk, charging ``budget[0]``; stop past ``limit``."""
    written = 0
    with open(dest, "xb") as out:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                return written
            written += len(chunk)
            budget[0] += len(chunk)
            if budget[0] > limit:
                raise UploadTooLarge(f"{what} is over the server's limit of {limit >> 20} MB (--max-upload-mb)")
            out.write(chunk)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _member_names(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts:
        raise InputError(f"zip member {name!r} points outside the upload (absolute path or '..'); refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InputError(f"zip member {name!r} is a symbolic link; refused")
    if info.flag_bits & 0x1:
        raise InputError(f"zip member {name!r} is encrypted; upload an unencrypted zip")


def _wanted(info: zipfile.ZipInfo) -> bool:
    """Files of a series, not folders or the hidden files archivers add (``__MACOSX``, ``.DS_Store``)."""
    parts = info.filename.replace("\\", "/").split("/")
    return not info.is_dir() and not any(p.startswith((".", "__MACOSX")) for p in parts if p)


def _unzip(archive: Path, dest: Path, limits: UploadLimits) -> list[Path]:
    """A zip's files into ``dest`` under made-up names (keeping each suffix), every member checked first."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _member_names(info)
            members = [i for i in infos if _wanted(i)]
            if not members:
                raise InputError("the zip holds no files")
            if len(members) > limits.max_files:
                raise InputError(f"the zip holds {len(members)} files; the server takes at most {limits.max_files}")
            declared = sum(i.file_size for i in members)
            if declared > limits.unpacked:
                raise UploadTooLarge(f"the zip unpacks to {declared >> 20} MB; the server takes at most "
                                     f"{limits.unpacked >> 20} MB")
            return [_inflate(zf, info, dest / f"{n:05d}{split_suffix(Path(info.filename).name)[1].lower()}")
                    for n, info in enumerate(members)]
    except zipfile.BadZipFile as exc:
        raise InputError(f"the zip is damaged or truncated ({exc})") from exc


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Path:
    """One member, counting the bytes actually inflated against the size it declared."""
    budget = [0]
    try:
        with zf.open(info) as src:
            _copy(src, path, budget, info.file_size, f"zip member {info.filename!r} (it inflates past its declared size)")
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as exc:
        raise InputError(f"zip member {info.filename!r} is damaged or truncated ({exc})") from exc
    return path


def _memory_mapped(array: np.ndarray) -> bool:
    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


class Upload:
    """A private temporary folder receiving one upload's files; ``scan()`` reads them."""

    def __init__(self, limits: UploadLimits, work_dir: Optional[Path] = None) -> None:
        self.limits = limits
        self.folder = Path(tempfile.mkdtemp(prefix="casam-upload-", dir=work_dir))  # mode 0700
        self.files: list[Path] = []
        self._budget = [0]

    def add(self, name: str, stream: BinaryIO) -> Path:
        """Store one uploaded file (its ``name`` only lends the suffix); counted against the limits."""
        check_name(name)
        if len(self.files) >= self.limits.max_files:
            raise InputError(f"an upload holds at most {self.limits.max_files} files")
        suffix = split_suffix(name)[1].lower() or (ZIP_SUFFIX if name.lower().endswith(ZIP_SUFFIX) else "")
        path = self.folder / f"{len(self.files):05d}{suffix}"
        _copy(stream, path, self._budget, self.limits.max_bytes, "the upload")
        self.files.append(path)
        return path

    def _target(self) -> Path:
        """What to read: the one file, or a folder holding the series."""
        if not self.files:
            raise InputError("the upload holds no file: send one or more as multipart field 'file'")
        if len(self.files) == 1 and self.files[0].suffix == ZIP_SUFFIX:
            series = self.folder / "series"
            series.mkdir()
            inner = _unzip(self.files[0], series, self.limits)
            return inner[0] if len(inner) == 1 else series
        if len(self.files) == 1:
            return self._typed(self.files[0])
        series = self.folder / "series"
        series.mkdir()
        for path in self.files:
            if not _is_dicom(path):
                raise InputError("several files must be the DICOM files of one series; one of them is not DICOM "
                                 "(send a picture or NIfTI file alone)")
            path.rename(series / path.name)
        return series

    @staticmethod
    def _typed(path: Path) -> Path:
        """A file without a known suffix is read as DICOM when it is DICOM, else refused."""
        if split_suffix(path.name)[1]:
            return path
        if path.suffix == ZIP_SUFFIX or not _is_dicom(path):
            raise InputError("wrong type: upload a PNG, JPEG, TIFF, NIfTI (.nii, .nii.gz) or DICOM file, "
                             "DICOM files of one series, or one zip of a series")
        return path.rename(path.with_suffix(".dcm"))

    def scan(self, options: ReadOptions = ReadOptions()) -> tuple[Scan, Optional[Callable[[], None]]]:
        """The upload as a Scan, and the cleanup its session must run at its end (None: the
        folder is gone already, the scan holds everything in memory). On a refusal the folder
        is removed before the error leaves."""
        try:
            target = self._target()
            if target.is_file() and not split_suffix(target.name)[1]:
                target = self._typed(target)
            scan = read(target, options)
        except BaseException:
            self.remove()
            raise
        if _memory_mapped(scan.data):
            return scan, self.remove
        self.remove()
        return scan, None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def scan_from_files(files: Sequence[tuple[str, BinaryIO]], limits: UploadLimits, work_dir: Optional[Path] = None,
                    options: ReadOptions = ReadOptions()) -> tuple[Scan, Optional[Callable[[], None]]]:
    """Uploaded (name, stream) pairs → (Scan, cleanup or None); see ``Upload.scan``."""
    upload = Upload(limits, work_dir)
    try:
        for name, stream in files:
            upload.add(name, stream)
    except BaseException:
        upload.remove()
        raise
    return upload.scan(options)
