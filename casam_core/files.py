"""Atomic writes and content hashes: the single implementation every stage uses.

Every artifact (bundle files, ONNX graphs, manifests, masks) is written to a temporary file
in the same folder and renamed into place, so a crash or a kill leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]
#: The published JSON Schemas (installed with the package; docs/*.schema.json link here).
SCHEMA_DIR = Path(__file__).with_name("schemas")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(source: Union[PathLike, bytes], expected: str, error: type[Exception], label: str,
                 recorded_in: str, hint: str = "", what: str = "the file") -> None:
    """Raise ``error`` unless ``source`` (a file, or bytes read from an archive) has sha256 ``expected``.

    The one check behind bundle task files, export engine files and task-package members.
    The caller passes its own error type (``BundleError``, ``ManifestError``: both
    ``CasamError``, neither a kind of the other), so a damaged bundle never reads as a
    damaged export. ``label`` opens the message and names the file, ``recorded_in`` is where
    ``expected`` comes from, ``what`` what was modified, ``hint`` what to do.
    """
    if isinstance(source, bytes):
        got = sha256_bytes(source)
    elif not Path(source).is_file():
        raise error(f"{label} is missing{hint}")
    else:
        got = sha256_file(source)
    if got != expected:
        raise error(f"{label} has sha256 {got[:12]}…, {recorded_in} says {str(expected)[:12]}… "
                    f"({what} was modified or corrupted{hint})")


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


def check_out_dir(out: PathLike, error: type[Exception], option: str = "--out") -> Path:
    """``out`` when it names a folder, or a path where one can be made; else ``error``.

    Checked before any work: ``mkdir`` on a file would only say "File exists" at the end.
    """
    out = Path(out)
    for existing in (out, *out.parents):
        if existing.exists():
            if not existing.is_dir():
                raise error(f"{option} {out} is a file" + ("" if existing == out else f" ({existing} is a file)")
                            + "; give a folder")
            break
    return out


class _NonFinite(str):
    """What ``NaN``/``Infinity``/``-Infinity`` parse to in casam documents: never a number,
    so a threshold of NaN (which no comparison can ever pass) cannot slip through."""


def read_json_strict(path: PathLike) -> Any:
    """``json.load`` that keeps NaN and ±Infinity out of the numbers (Python's json accepts
    them although JSON has none); ``check_document`` then names where they were."""
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh, parse_constant=_NonFinite)


def _json_path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)) else f"{parent}[{str(key)!r}]"


def _non_finite(data: Any, where: str = "$") -> Optional[tuple[str, str]]:
    """(JSON path, text) of the first NaN or ±Infinity in ``data``, or None."""
    if isinstance(data, _NonFinite):
        return where, str(data)
    if isinstance(data, float) and not math.isfinite(data):
        return where, repr(data)
    items = data.items() if isinstance(data, Mapping) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite(value, _json_path(where, key))
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _validators() -> dict[str, Any]:
    """One validator per schema file (``bundle``, ``manifest``, ``calibration``), sharing a
    registry so that the manifest can refer to the bundle's definitions."""
    import jsonschema
    from referencing import Registry, Resource

    schemas = {p.name[: -len(".schema.json")]: json.loads(p.read_text(encoding="utf-8"))
               for p in sorted(SCHEMA_DIR.glob("*.schema.json"))}
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return {name: jsonschema.Draft202012Validator(s, registry=registry) for name, s in schemas.items()}


def schema_for_format(fmt: str) -> Optional[str]:
    """The schema whose ``format`` is the constant ``fmt`` (``casam-bundle`` → ``bundle``)."""
    for name, validator in _validators().items():
        if validator.schema.get("properties", {}).get("format", {}).get("const") == fmt:
            return name
    return None


def check_finite(data: Any, error: type[Exception], where: PathLike) -> None:
    """Raise ``error`` naming the JSON path of the first NaN or ±Infinity in ``data``."""
    found = _non_finite(data)
    if found:
        raise error(f"{where}: {found[0]} is {found[1]}; every number must be finite")


def check_document(data: Any, schema: str, error: type[Exception], where: PathLike) -> None:
    """Raise ``error`` naming ``where`` (the file), the field and what was expected when
    ``data`` breaks ``casam_core/schemas/<schema>.schema.json`` or holds a non-finite number."""
    import jsonschema

    check_finite(data, error, where)
    problem = jsonschema.exceptions.best_match(_validators()[schema].iter_errors(data))
    if problem is not None:
        message = problem.message if len(problem.message) <= 200 else problem.message[:200] + "…"
        raise error(f"{where}: {problem.json_path}: {message} (schema: {schema}.schema.json)")


def read_checked_json(path: PathLike, schema: str, error: type[Exception]) -> Any:
    """Read a JSON file that has a schema but no format header (a task's calibration.json)."""
    try:
        data = read_json_strict(path)
    except (ValueError, OSError) as exc:
        raise error(f"{path} is corrupt ({exc})") from exc
    check_document(data, schema, error, path)
    return data


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
    rather than misread, so the reading and the checks live here once: the format header
    first (so an old or new version gets its own message), then the published JSON Schema
    of that format (``casam_core/schemas/``), which the readers rely on instead of checking
    fields one by one. ``data`` skips the read (an exporter validating a manifest before
    writing it); ``missing`` is the message for an absent file.
    """
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise error(missing)
        try:
            # A format without a published schema (a task package's index) checks its own fields.
            data = read_json_strict(path) if schema_for_format(fmt) else read_json(path)
        except (ValueError, OSError) as exc:
            raise error(f"{path} is corrupt ({exc})") from exc
    if not isinstance(data, Mapping) or data.get("format") != fmt:
        raise error(f"{path} is not a {what} (format {fmt!r} expected)")
    got = data.get("format_version")
    if got != version:
        raise error(f"{path} has format version {got!r}; this casam reads version {version}{upgrade_hint}")
    schema = schema_for_format(fmt)
    if schema is not None:
        check_document(data, schema, error, path)
    elif not _validators():  # a broken install: never read bundles or manifests unchecked
        raise error(f"no JSON Schemas in {SCHEMA_DIR}; reinstall casam")
    return dict(data)
