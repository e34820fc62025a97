"""Task packages: one site's task in one file, and its import into another bundle.

A package is a zip archive::

    package.json            index: format, casam version, the task's bundle.json record
                            (with every file's sha256), SAM model and checkpoint sha256,
                            preprocessing and pooling
    files/<task file>       the five files of tasks/<name>/ (TASK_FILES), nothing else
    signature.json          optional: Ed25519 signature of package.json's exact bytes

It holds no image data: ``split.json`` names image stems only, and ``--redact-split``
drops those (and the site's data path) too. Importing checks everything before it writes
anything, in the order cheapest first: archive entries (no path may leave the task folder),
format version, each file's sha256 against the index, the calibration (τ finite and
reproduced by the recorded scores), the signature, then compatibility with the bundle
(SAM checkpoint, preprocessing, name). The task is then staged and committed under the
bundle lock exactly like a trained one, so a refused or killed import leaves the bundle as
it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Optional

from casam_bundle.calibration import check_calibration
from casam_bundle.errors import BundleError
from casam_bundle.format import TASK_FILES, Bundle, TaskRecord, check_task_name
from casam_bundle.lock import DEFAULT_WAIT_S, bundle_lock
from casam_bundle import signing
from casam_core.faults import fault_point
from casam_core.ownership import refuse_existing
from casam_core.files import PathLike, atomic_path, atomic_write_bytes, read_versioned_json, sha256_bytes
from runtime.preprocess import Preprocessing

PACKAGE_FORMAT = "casam-task-package"
PACKAGE_FORMAT_VERSION = 1
PACKAGE_SUFFIX = ".casam"
INDEX = "package.json"
SIGNATURE = "signature.json"
FILES_PREFIX = "files/"
#: Largest archive members read, by suffix: a package is untrusted input, so a zip bomb must be
#: refused before it fills memory. Legitimate members are far smaller: the alignment layer's
#: weights are 14.2 MB for every SAM variant (it works at the prompt width, 256), the VAE's
#: 0.4 MB, and split.json lists one stem per image. So at most 64 + 64 + 3 × 16 + 16 + 1 MiB
#: of members are held, and one member in flight at most doubles its cap (docs/RELIABILITY.md).
MAX_WEIGHTS_BYTES = 64 << 20
MAX_JSON_BYTES = 16 << 20
MEMBER_CAPS = {".safetensors": MAX_WEIGHTS_BYTES, ".json": MAX_JSON_BYTES}
READ_CHUNK = 1 << 20
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same task packs to the same bytes
#: Called under the lock before an import commits: (bundle, record, staged task folder).
Vet = Callable[[Bundle, TaskRecord, Path], None]


@dataclass
class TaskPackage:
    """A package read and checked on its own (not yet against a bundle)."""

    path: Path
    index_bytes: bytes
    index: dict[str, Any]
    files: dict[str, bytes]
    signature: Optional[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.index["task"]["name"]

    def record(self, name: Optional[str] = None) -> TaskRecord:
        record = TaskRecord.from_dict(self.index["task"])
        record.name = name or record.name
        return record


# ----- packing -----------------------------------------------------------------------------
def redact_split(split: Mapping[str, Any]) -> dict[str, Any]:
    """split.json without image stems or the site's data path: only counts remain."""
    kept = {k: v for k, v in split.items() if k in ("source", "seed", "kind", "axis")}
    counts = {f"n_{k}": len(split.get(k) or []) for k in ("train", "test", "skipped_empty")}
    return {**kept, **counts, "redacted": True}


def _zip_bytes(entries: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def pack_task(bundle_dir: PathLike, task: str, out: PathLike, *, redact: bool = False,
              sign_key: Optional[PathLike] = None, overwrite: bool = False) -> dict[str, Any]:
    """Write task ``task`` of the bundle as one package file ``out``; returns its index.

    An existing ``out`` is replaced only with ``overwrite``, and a bundle's or export's own
    ``bundle.json``/``manifest.json`` never (casam_core.ownership.refuse_existing)."""
    from casam_core import __version__

    refuse_existing(out, overwrite, error=BundleError)
    bundle = Bundle.open(bundle_dir, verify=False)
    record = bundle.task(check_task_name(task))
    bundle.verify_task(record)
    files = {f: (bundle.task_dir(task) / f).read_bytes() for f in TASK_FILES}
    check_calibration(record.to_dict(), json.loads(files["calibration.json"]), f"task {task!r}")
    task_entry = record.to_dict()
    if redact:
        files["split.json"] = (json.dumps(redact_split(json.loads(files["split.json"])), indent=2) + "\n").encode()
        task_entry["hyperparameters"] = {k: v for k, v in record.hyperparameters.items() if k != "data"}
    task_entry["files"] = {f: sha256_bytes(data) for f, data in files.items()}
    index = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_FORMAT_VERSION,
        "casam_version": __version__,
        "task": task_entry,
        "sam": dict(bundle.meta["sam"]),
        "preprocessing": dict(bundle.meta["preprocessing"]),
        "pooling": dict(bundle.meta["pooling"]),
        "split_redacted": bool(redact),
    }
    index_bytes = (json.dumps(index, indent=2) + "\n").encode("utf-8")
    entries = {INDEX: index_bytes, **{FILES_PREFIX + f: files[f] for f in TASK_FILES}}
    if sign_key is not None:
        entries[SIGNATURE] = (json.dumps(signing.sign(sign_key, index_bytes), indent=2) + "\n").encode()
    atomic_write_bytes(out, _zip_bytes(entries))
    return index


# ----- reading a package on its own ------------------------------------------------------
def _check_entry_name(name: str, where: Path) -> None:
    """Refuse any archive path that could land outside the task folder (zip-slip)."""
    parts = PurePosixPath(name).parts
    if name.startswith("/") or "\\" in name or ":" in name or "\x00" in name or ".." in parts:
        raise BundleError(f"{where}: archive entry {name!r} would escape the task folder (zip-slip); package refused")
    allowed = {INDEX, SIGNATURE, *(FILES_PREFIX + f for f in TASK_FILES)}
    if name not in allowed:
        raise BundleError(f"{where}: unexpected archive entry {name!r}; a task package holds only "
                          f"{INDEX}, {SIGNATURE} and {FILES_PREFIX}<task file>")


def _member_cap(name: str) -> int:
    """The most bytes archive entry ``name`` may inflate to (names are checked first)."""
    return MEMBER_CAPS.get(PurePosixPath(name).suffix, MAX_JSON_BYTES)


def _open_archive(path: Path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """The archive and its entries by name, every name and declared size checked before any
    byte is inflated: a bomb is refused by its directory when the directory tells the truth."""
    archive = zipfile.ZipFile(path)
    entries: dict[str, zipfile.ZipInfo] = {}
    try:
        for info in archive.infolist():
            _check_entry_name(info.filename, path)
            if info.filename in entries:
                raise BundleError(f"{path}: archive entry {info.filename!r} appears twice; package refused")
            if info.file_size > _member_cap(info.filename):
                raise BundleError(f"{path}: archive entry {info.filename!r} declares {info.file_size} bytes, more "
                                  f"than the {_member_cap(info.filename)} a task package's member may hold; refused")
            entries[info.filename] = info
    except BaseException:
        archive.close()
        raise
    return archive, entries


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path,
                 expected_sha256: Optional[str] = None) -> bytes:
    """One entry, inflated chunk by chunk and hashed while it streams.

    The cap is checked against the bytes actually inflated, not only the declared size, so a
    lying directory cannot make this hold more than the cap (plus one chunk). With
    ``expected_sha256`` a wrong member is refused as soon as its last chunk is read."""
    cap = _member_cap(info.filename)
    buffer = bytearray()
    digest = hashlib.sha256()
    with archive.open(info) as fh:
        while True:
            chunk = fh.read(READ_CHUNK)
            if not chunk:
                break
            if len(buffer) + len(chunk) > cap:
                raise BundleError(f"{path}: archive entry {info.filename!r} inflates to more than {cap} bytes; refused")
            digest.update(chunk)
            buffer += chunk
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise BundleError(f"{path}: {info.filename} has sha256 {digest.hexdigest()[:12]}…, the index says "
                          f"{str(expected_sha256)[:12]}… (the package was modified or corrupted; refused)")
    return bytes(buffer)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{what} is not valid JSON ({exc})") from exc


def _check_index(index: dict[str, Any], path: Path) -> None:
    task = index.get("task")
    if not isinstance(task, dict):
        raise BundleError(f"{path}: {INDEX} has no task record")
    check_task_name(task.get("name"), f"{path} ({INDEX})")
    files = task.get("files")
    if not isinstance(files, dict) or set(files) != set(TASK_FILES):
        raise BundleError(f"{path}: {INDEX} must list the sha256 of exactly {', '.join(TASK_FILES)}")
    for key in ("alignment", "vae"):
        if not isinstance(task.get(key), dict):
            raise BundleError(f"{path}: the task record in {INDEX} has no {key!r} entry")
    for key in ("sam", "preprocessing", "pooling"):
        if not isinstance(index.get(key), dict):
            raise BundleError(f"{path}: {INDEX} has no {key!r} entry")


def read_package(path: PathLike) -> TaskPackage:
    """Read a package and check it on its own: entries, format version, file hashes, calibration.

    Memory stays bounded whatever the archive claims: every member is capped (MEMBER_CAPS)
    by its declared size before any byte is inflated and by the bytes actually inflated
    while it streams, and is hashed as it streams (docs/RELIABILITY.md, archive memory)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"task package {path} does not exist")
    try:
        archive, entries = _open_archive(path)
        with archive:
            return _read_checked(archive, entries, path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not a readable task package ({exc})") from exc


def _read_checked(archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], path: Path) -> TaskPackage:
    """The index first (its format version and file list), then each file against its sha256."""
    if INDEX not in entries:
        raise BundleError(f"{path} is not a casam task package: it has no {INDEX}")
    index_bytes = _read_member(archive, entries[INDEX], path)
    index = read_versioned_json(path, PACKAGE_FORMAT, PACKAGE_FORMAT_VERSION, BundleError, "casam task package",
                                missing="", data=_json(index_bytes, f"{path}: {INDEX}"))
    _check_index(index, path)
    files: dict[str, bytes] = {}
    for fname, expected in index["task"]["files"].items():
        info = entries.get(FILES_PREFIX + fname)
        if info is None:
            raise BundleError(f"{path}: {FILES_PREFIX}{fname} is missing")
        files[fname] = _read_member(archive, info, path, expected)
    check_calibration(index["task"], _json(files["calibration.json"], f"{path}: calibration.json"), f"{path}")
    signature = _json(_read_member(archive, entries[SIGNATURE], path), f"{path}: {SIGNATURE}") \
        if SIGNATURE in entries else None
    if signature is not None and not isinstance(signature, dict):
        raise BundleError(f"{path}: {SIGNATURE} is not a signature record")
    return TaskPackage(path, index_bytes, index, files, signature)


# ----- importing into a bundle -----------------------------------------------------------
def check_signature(package: TaskPackage, trust: Optional[PathLike], required: bool, bundle_root: Path) -> Optional[str]:
    """The trusted key id that signed the package, None when no trust folder is given."""
    if trust is None:
        if required:
            raise BundleError(f"bundle {bundle_root} requires signed task packages; pass --trust with the sites' public keys")
        return None
    if package.signature is None:
        raise BundleError(f"{package.path} is not signed, and --trust requires a signature by a trusted key")
    return signing.verify(package.signature, package.index_bytes, signing.load_trusted(trust), str(package.path))


def check_compatible(package: TaskPackage, bundle: Bundle, name: str) -> None:
    """Refuse a task that this bundle's SAM, preprocessing or task names cannot take."""
    sam, where = package.index["sam"], str(package.path)
    if sam.get("model") != bundle.sam_model:
        raise BundleError(
            f"{where} holds a task for the SAM variant {sam.get('model')!r}, bundle {bundle.root} is tied to "
            f"{bundle.sam_model!r}; a bundle's tasks all share one encoder variant"
        )
    if sam.get("checkpoint_sha256") != bundle.checkpoint_sha256:
        raise BundleError(
            f"{where} was trained on SAM {sam.get('model')!r} checkpoint {str(sam.get('checkpoint_sha256'))[:16]}…, "
            f"bundle {bundle.root} uses {bundle.sam_model!r} {bundle.checkpoint_sha256[:16]}…; a task only works "
            "with the SAM it was trained on"
        )
    for key in ("preprocessing", "pooling"):
        if package.index[key] != bundle.meta[key]:
            raise BundleError(f"{where} was trained with {key} {package.index[key]}, bundle {bundle.root} uses "
                              f"{bundle.meta[key]}; the task cannot be mixed into this bundle")
    if name in bundle.task_names:
        raise BundleError(f"task {name!r} already exists in bundle {bundle.root}; unpack it under another name with --as NAME")


def _open_or_create(root: Path, package: TaskPackage, wait: float) -> Bundle:
    if (root / "bundle.json").exists():
        return Bundle.open(root)
    sam = package.index["sam"]
    return Bundle.create(root, sam["model"], sam["checkpoint_sha256"], Preprocessing.from_dict(package.index["preprocessing"]),
                         temperature=float(package.index["pooling"]["temperature"]),
                         untrained_sam=bool(sam.get("untrained", False)), wait=wait)


def unpack_package(
    bundle_dir: PathLike,
    package_path: PathLike,
    *,
    as_name: Optional[str] = None,
    trust: Optional[PathLike] = None,
    require_signatures: bool = False,
    vet: Optional[Vet] = None,
    wait: float = DEFAULT_WAIT_S,
) -> dict[str, Any]:
    """Add the package's task to the bundle (created from the package when absent).

    ``require_signatures`` makes the bundle refuse unsigned packages from now on (it needs
    ``trust``). ``vet`` may refuse the staged task (the trainer's take-over check).
    """
    root = Path(bundle_dir)
    package = read_package(package_path)
    name = check_task_name(as_name if as_name is not None else package.name)
    if require_signatures and trust is None:
        raise BundleError("--require-signatures needs --trust: the folder of the sites' public keys")
    existing = Bundle.open(root, verify=False) if (root / "bundle.json").exists() else None
    required = existing is not None and existing.require_signatures
    signed_by = check_signature(package, trust, required, root)
    if existing is not None:
        check_compatible(package, existing, name)  # cheap refusals before taking the lock
    with bundle_lock(root, wait):
        bundle = _open_or_create(root, package, wait)
        if bundle.require_signatures and signed_by is None:
            check_signature(package, trust, True, root)
        check_compatible(package, bundle, name)
        staged = root / ".staging" / f".unpack-{name}"
        shutil.rmtree(staged, ignore_errors=True)  # left by a killed import
        staged.mkdir(parents=True)
        try:
            for fname, data in package.files.items():
                with atomic_path(staged / fname) as tmp:
                    tmp.write_bytes(data)
            record = package.record(name)
            if vet is not None:
                vet(bundle, record, staged)
            if require_signatures:  # before the commit: a kill in between errs on the strict side
                bundle.set_require_signatures(wait)
            fault_point("unpack:before-commit")
            bundle.commit_task(record, staged, wait=wait)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return {"task": name, "from": package.name, "bundle": str(root), "tasks": bundle.task_names,
            "signed_by": signed_by, "split_redacted": bool(package.index.get("split_redacted")),
            "require_signatures": bundle.require_signatures}
