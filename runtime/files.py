"""Atomic writes and content hashes: the single implementation every stage uses.

Every artifact (bundle files, ONNX graphs, manifests, masks) is written to a temporary file
in the same folder and renamed into place, so a crash or a kill leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over it.

    For writers that insist on a file name (``safetensors.save_file``, ``onnx.save``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; artifacts are shared files, so give them the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def read_versioned_json(
    path: PathLike,
    fmt: str,
    version: int,
    error: type[Exception],
    what: str,
    missing: str,
    upgrade_hint: str = "",
    data: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Read a casam JSON document (bundle.json, manifest.json) and check its format header.

    Bundles and manifests are both versioned documents that a later stage must refuse
    rather than misread, so the reading and the checks live here once. ``data`` skips the
    read (an exporter validating a manifest before writing it); ``missing`` is the message
    for an absent file.
    """
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise error(missing)
        try:
            data = read_json(path)
        except (ValueError, OSError) as exc:
            raise error(f"{path} is corrupt ({exc})") from exc
    if not isinstance(data, Mapping) or data.get("format") != fmt:
        raise error(f"{path} is not a {what} (format {fmt!r} expected)")
    got = data.get("format_version")
    if got != version:
        raise error(f"{path} has format version {got!r}; this casam reads version {version}{upgrade_hint}")
    return dict(data)
