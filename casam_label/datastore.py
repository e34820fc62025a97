"""Where a server's images come from and its labels go: a local folder (``--datastore DIR``).

The interface (``Datastore``) is small on purpose; the MONAI Label API and a DICOMweb
datastore implement or consume the same four calls:

- ``images()``: what a client may open, as ``DatastoreItem`` (id, name, kind);
- ``open(image_id, options)``: the image as a ``Scan``;
- ``save_label(image_id, data, suffix, tag, overwrite)``: store a label file for an image;
- ``label(image_id, tag)``: the stored label's path, or None.

Ids are untrusted client input. In the local datastore an id is the image's path relative
to the folder, in POSIX form (``ct/case1.nii.gz``; a DICOM series is its folder). An id
that is absolute, holds ``..``, a backslash, a hidden part or a NUL, or that resolves
outside the folder (a symlink pointing out) is refused (400) before anything is opened; an
id that names nothing is 404. Labels are written only under ``<datastore>/labels/<tag>/``
with names this module makes from the id (percent-encoded, so two ids never share a
name), atomically, and an existing label is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol
from urllib.parse import quote

from casam_core.errors import InputError
from casam_core.files import atomic_write_bytes
from casam_core.names import check_task_name
from casam_io.readers import ALL_SUFFIXES, ReadOptions, read, reader_for, split_suffix, suffixes
from casam_io.scan import Scan
from casam_io.volume_io import is_dicom_series

LABELS = "labels"
LABEL_SUFFIXES = (".nii.gz", ".nii", ".png", ".dcm")
MAX_ITEMS = 100_000  # a listing stops here: a datastore pointed at / must not walk the disk
MAX_ID = 1024


class DatastoreNotFound(InputError):
    """The id is well-formed but names no image (HTTP 404)."""

    status = 404


class LabelExists(InputError):
    """A label is stored for this image and tag already, and replacing it was not asked (HTTP 409)."""

    status = 409


@dataclass(frozen=True)
class DatastoreItem:
    id: str
    name: str
    kind: str  # "image" (a 2-D picture or DICOM file), "volume" (NIfTI) or "series" (a DICOM folder)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind}


class Datastore(Protocol):
    """What the APIs need of a datastore (local folder here; DICOMweb later)."""

    def images(self) -> list[DatastoreItem]: ...

    def open(self, image_id: str, options: ReadOptions = ReadOptions()) -> Scan: ...

    def save_label(self, image_id: str, data: bytes, suffix: str, tag: str = "final",
                   overwrite: bool = False) -> str: ...

    def label(self, image_id: str, tag: str = "final") -> Optional[Path]: ...


def check_id(image_id: object) -> str:
    """A syntactically safe relative id (nothing touched on disk yet), else InputError (400)."""
    if not isinstance(image_id, str) or not image_id or len(image_id) > MAX_ID:
        raise InputError(f"a datastore id is a relative path of 1 to {MAX_ID} characters")
    parts = image_id.split("/")
    if image_id.startswith("/") or "\\" in image_id or "\0" in image_id or ":" in parts[0] or \
            any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise InputError(f"datastore id {image_id!r} is not a plain relative path inside the datastore")
    if parts[0] == LABELS:
        raise InputError(f"datastore id {image_id!r} names a label, not an image")
    return image_id


class LocalDatastore:
    """A folder of images and DICOM series folders; labels go to ``<root>/labels/``."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise InputError(f"--datastore {root} is not a folder")
        self.root = root.resolve()

    def resolve(self, image_id: str) -> Path:
        """The path of ``image_id``, which is inside the folder after symlinks are followed."""
        path = self.root / check_id(image_id)
        real = path.resolve()
        if real != self.root and self.root not in real.parents:
            raise InputError(f"datastore id {image_id!r} leads outside the datastore; refused")
        if not real.exists():
            raise DatastoreNotFound(f"no image {image_id!r} in the datastore")
        return real

    def _item(self, path: Path) -> Optional[DatastoreItem]:
        rel = path.relative_to(self.root).as_posix()
        if path.is_dir():
            return DatastoreItem(rel, path.name, "series") if is_dicom_series(path, suffixes("picture")) else None
        if not split_suffix(path.name)[1]:
            return None
        return DatastoreItem(rel, path.name, "volume" if reader_for(path).kind == "volume" else "image")

    def images(self) -> list[DatastoreItem]:
        """Image files and DICOM series folders, sorted by id; hidden names, ``labels/`` and
        symlinks leading out are skipped, and a series folder is one item (not descended)."""
        found: list[DatastoreItem] = []
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here == self.root and d == LABELS))
            keep = []
            for d in dirs:
                item = self._safe_item(here / d)
                if item is not None:
                    found.append(item)
                else:
                    keep.append(d)
            dirs[:] = [d for d in keep if not (here / d).is_symlink()]
            found += [i for f in sorted(files) if not f.startswith(".") and f.lower().endswith(ALL_SUFFIXES)
                      for i in [self._safe_item(here / f)] if i is not None]
            if len(found) >= MAX_ITEMS:
                break
        return sorted(found[:MAX_ITEMS], key=lambda i: i.id)

    def _safe_item(self, path: Path) -> Optional[DatastoreItem]:
        try:
            real = path.resolve()
            if self.root not in real.parents:
                return None
            return self._item(path)
        except (OSError, InputError):
            return None

    def open(self, image_id: str, options: ReadOptions = ReadOptions()) -> Scan:
        return read(self.resolve(image_id), options)

    def _label_path(self, image_id: str, tag: str, suffix: str) -> Path:
        check_task_name(tag, where="the label tag")
        if suffix not in LABEL_SUFFIXES:
            raise InputError(f"a label is stored as one of {', '.join(LABEL_SUFFIXES)}, not {suffix!r}")
        stem = split_suffix(image_id)[0]
        return self.root / LABELS / tag / (quote(stem, safe="") + suffix)

    def save_label(self, image_id: str, data: bytes, suffix: str, tag: str = "final",
                   overwrite: bool = False) -> str:
        """Store ``data`` as the ``tag`` label of ``image_id``; returns the label's id
        (relative to the datastore). An existing one is replaced only with ``overwrite``."""
        self.resolve(image_id)
        path = self._label_path(image_id, tag, suffix)
        existing = [p for s in LABEL_SUFFIXES for p in [path.with_name(path.name[: -len(suffix)] + s)] if
                    os.path.lexists(p)]
        if existing and not overwrite:
            raise LabelExists(f"image {image_id!r} has a {tag!r} label already; replacing it needs overwrite")
        if any(p.is_symlink() or not p.is_file() for p in existing):
            raise InputError(f"the {tag!r} label of {image_id!r} is not a plain file; refusing to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        for old in existing:
            if old != path:
                old.unlink()
        return path.relative_to(self.root).as_posix()

    def label(self, image_id: str, tag: str = "final") -> Optional[Path]:
        self.resolve(image_id)
        check_task_name(tag, where="the label tag")
        for suffix in LABEL_SUFFIXES:
            path = self._label_path(image_id, tag, suffix)
            if path.is_file() and not path.is_symlink():
                return path
        return None
