"""The task bundle on disk: the only thing the trainer writes and the export reads.

Layout (documented in docs/FORMATS.md)::

    bundle.json                       format version, SAM, preprocessing, task order
    tasks/<name>/alignment.safetensors
    tasks/<name>/vae.safetensors
    tasks/<name>/calibration.json
    tasks/<name>/split.json
    tasks/<name>/train_log.json

A task is staged in a private folder and moved into ``tasks/`` in one rename, and only
then is ``bundle.json`` rewritten (atomically). A kill at any moment therefore leaves the
bundle exactly as it was before the task started, and adding a task never touches the
files of earlier tasks. Every write holds the bundle's lock (``casam_bundle/lock.py``) and
re-reads ``bundle.json`` under it, so concurrent writers queue instead of overwriting
each other's tasks.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casam_bundle.errors import BundleError
from casam_bundle.lock import DEFAULT_WAIT_S, bundle_lock
from casam_core.faults import fault_point
from casam_core.files import (
    atomic_write_json,
    check_sha256,
    read_checked_json,
    read_json,
    read_versioned_json,
    sha256_file,
)
from casam_core.names import check_task_name as _check_name
from runtime.preprocess import Preprocessing

BUNDLE_FORMAT = "casam-bundle"
BUNDLE_FORMAT_VERSION = 1
TASK_FILES = ("alignment.safetensors", "vae.safetensors", "calibration.json", "split.json", "train_log.json")
THRESHOLD_KEYS = ("p95", "p97", "p99", "mean_plus_2std")
#: Where ``remove --keep`` moves a withdrawn task's folder (outside ``tasks/``, never exported).
REMOVED_DIR = "removed"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_task_name(name: object, where: str = "") -> str:
    """The one task-name check (casam_core.names), raising ``BundleError`` for bundle files."""
    return _check_name(name, BundleError, where)


@dataclass
class TaskRecord:
    """One task's entry in bundle.json."""

    name: str
    files: dict[str, str]  # file name → sha256
    alignment: dict[str, int]  # num_blocks, dim
    vae: dict[str, float]  # in_dim, latent_dim, hidden_dim, beta
    threshold_key: str  # which calibration.json entry routes (p97 by default)
    threshold: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskRecord":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Bundle:
    """A bundle folder. ``Bundle.open`` validates it; ``Bundle.create`` starts a new one."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta

    # ----- opening and creating -------------------------------------------------------
    @staticmethod
    def _read_meta(root: Path) -> dict[str, Any]:
        meta_path = root / "bundle.json"
        meta = read_versioned_json(meta_path, BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BundleError, "casam bundle file",
                                   missing=f"{root} is not a casam bundle: {meta_path} is missing")
        for i, task in enumerate(meta.get("tasks") or []):
            check_task_name(task.get("name") if isinstance(task, dict) else None, f"{meta_path} (task #{i})")
        return meta

    @classmethod
    def open(cls, root: os.PathLike | str, verify: bool = True) -> "Bundle":
        root = Path(root)
        bundle = cls(root, cls._read_meta(root))
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def create(
        cls,
        root: os.PathLike | str,
        sam_model: str,
        checkpoint_sha256: str,
        preprocessing: Preprocessing,
        temperature: float = 1.0,
        untrained_sam: bool = False,
        wait: float = DEFAULT_WAIT_S,
    ) -> "Bundle":
        root = Path(root)
        meta = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "sam": {"model": sam_model, "checkpoint_sha256": checkpoint_sha256, "untrained": untrained_sam},
            "preprocessing": preprocessing.to_dict(),
            "pooling": {"temperature": float(temperature)},
            "tasks": [],
        }
        bundle = cls(root, meta)
        with bundle_lock(root, wait):
            if (root / "bundle.json").exists():
                raise BundleError(f"{root} already holds a bundle")
            bundle._write_meta()
        return bundle

    def reload(self) -> None:
        """Re-read bundle.json: another process may have committed since this one opened it."""
        self.meta = self._read_meta(self.root)

    def _write_meta(self) -> None:
        from casam_core import __version__

        self.meta["casam_version"] = __version__
        atomic_write_json(self.root / "bundle.json", self.meta)

    # ----- reading ---------------------------------------------------------------------
    @property
    def sam_model(self) -> str:
        return self.meta["sam"]["model"]

    @property
    def checkpoint_sha256(self) -> str:
        return self.meta["sam"]["checkpoint_sha256"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def temperature(self) -> float:
        return float(self.meta["pooling"]["temperature"])

    @property
    def tasks(self) -> list[TaskRecord]:
        return [TaskRecord.from_dict(t) for t in self.meta["tasks"]]

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.meta["tasks"]]

    @property
    def history(self) -> list[dict[str, Any]]:
        """Withdrawals, oldest first: ``{"event": "removed", "name", "time_utc", "files", "kept"}``."""
        return list(self.meta.get("history") or [])

    @property
    def require_signatures(self) -> bool:
        """Once set, every imported task package must be signed by a trusted key."""
        return bool(self.meta.get("require_signatures", False))

    def task(self, name: str) -> TaskRecord:
        for record in self.tasks:
            if record.name == name:
                return record
        raise BundleError(f"bundle {self.root} has no task {name!r}; tasks: {', '.join(self.task_names) or 'none'}")

    def task_dir(self, name: str) -> Path:
        return self.root / "tasks" / name

    def verify(self) -> None:
        """Check that every task file exists and matches the sha256 in bundle.json, and that its
        calibration.json (whose thresholds the export copies) follows its schema."""
        for record in self.tasks:
            self.verify_task(record)

    def verify_task(self, record: TaskRecord) -> None:
        """Check that one task's files exist and match the sha256 recorded for them, and that its
        calibration.json follows its schema."""
        for fname, expected in record.files.items():
            path = self.task_dir(record.name) / fname
            check_sha256(path, expected, BundleError, f"task {record.name!r}: {path}", "bundle.json")
        self.load_calibration(record.name)  # its schema, before any stage relies on it

    def load_calibration(self, name: str) -> dict[str, Any]:
        return read_checked_json(self.task_dir(name) / "calibration.json", "calibration", BundleError)

    def load_split(self, name: str) -> dict[str, Any]:
        return read_json(self.task_dir(name) / "split.json")

    def thresholds(self) -> list[float]:
        return [float(t.threshold) for t in self.tasks]

    # ----- writing ---------------------------------------------------------------------
    def staging_dir(self, name: str) -> Path:
        """Private folder where a task is built (and resumed) before it is committed."""
        return self.root / ".staging" / check_task_name(name)

    def commit_task(self, record: TaskRecord, staged: Path, replace: bool = False,
                    wait: float = DEFAULT_WAIT_S) -> None:
        """Move a fully written staged task into ``tasks/`` and record it in bundle.json.

        Under the bundle lock, bundle.json is re-read and the task appended to what is
        there now, so a task another process committed meanwhile is kept. The file hashes
        are computed from what is on disk, so bundle.json describes exactly the committed bytes.
        """
        check_task_name(record.name)
        missing = [f for f in TASK_FILES if not (staged / f).is_file()]
        if missing:
            raise BundleError(f"staged task {record.name!r} is incomplete: missing {', '.join(missing)}")
        record.files = {f: sha256_file(staged / f) for f in TASK_FILES}
        with bundle_lock(self.root, wait):
            self.reload()
            exists = record.name in self.task_names
            if exists and not replace:
                raise BundleError(f"task {record.name!r} already exists in {self.root}; pass --replace to retrain it")
            fault_point("commit:locked")
            self._move_into_tasks(record.name, staged)
            fault_point("commit:after-move")
            tasks = list(self.meta["tasks"])
            if exists:
                index = self.task_names.index(record.name)
                tasks[index] = record.to_dict()
            else:
                tasks.append(record.to_dict())
            self.meta["tasks"] = tasks
            self._write_meta()

    def _move_into_tasks(self, name: str, staged: Path) -> None:
        """Rename ``staged`` to ``tasks/<name>``; a folder already there (a replaced task, or
        one left unrecorded by a killed writer) is moved aside first and then deleted.
        bundle.json still names the old hashes until it is rewritten, so a crash in between
        is caught by verify()."""
        target = self.task_dir(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            trash = self.root / ".staging" / f".old-{name}-{os.getpid()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, trash)
            os.replace(staged, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staged, target)

    def remove_task(self, name: str, keep: bool = False, wait: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        """Withdraw task ``name``: drop it from bundle.json, record it in ``history``, then
        delete its folder (or move it to ``removed/`` with ``keep``). Returns the history entry.

        bundle.json is rewritten before any file moves, so a kill in between leaves a valid
        bundle without the task and an unrecorded folder that nothing reads (and that the
        next commit of that name replaces).
        """
        check_task_name(name)
        with bundle_lock(self.root, wait):
            self.reload()
            record = self.task(name)  # files need not verify: a damaged task can be withdrawn too
            kept = f"{REMOVED_DIR}/{name}-{utc_now().replace(':', '')}" if keep else None
            entry = {"event": "removed", "name": name, "time_utc": utc_now(), "files": dict(record.files), "kept": kept}
            fault_point("remove:locked")
            self.meta["tasks"] = [t for t in self.meta["tasks"] if t["name"] != name]
            self.meta["history"] = self.history + [entry]
            self._write_meta()
            fault_point("remove:after-commit")
            if not self.task_dir(name).exists():
                pass
            elif kept is not None:
                (self.root / REMOVED_DIR).mkdir(exist_ok=True)
                os.replace(self.task_dir(name), self.root / kept)
            else:
                trash = self.root / ".staging" / f".removed-{name}-{os.getpid()}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.task_dir(name), trash)
                shutil.rmtree(trash)
            return entry

    def set_require_signatures(self, wait: float = DEFAULT_WAIT_S) -> None:
        """From now on, refuse task packages that are not signed by a trusted key."""
        with bundle_lock(self.root, wait):
            self.reload()
            if not self.require_signatures:
                self.meta["require_signatures"] = True
                self._write_meta()
