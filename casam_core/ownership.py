"""Output ownership: a command writes only names it owns in its ``--out`` folder.

A mistyped ``--out`` must never destroy a bundle or a deployment, and one input's outputs
must never replace another's. Every writer that fills a folder with derived files goes
through ``OutputDir``:

- **Claim** (cheap, before any engine loads): ``--out`` may not be a file, a casam bundle
  (``bundle.json``) or an export (``manifest.json``), whatever ``--overwrite`` says. A folder
  holding files that this command did not write is refused unless ``--overwrite``.
- **Ledger**: the names a command wrote are recorded in ``.casam-outputs.json`` inside the
  folder, so that a rerun may replace its own earlier outputs and nothing else.
- **Stems**: ``allocate`` gives every input a stem whose output names collide with no other
  input's, with no reserved summary name (``evaluation.json``) nor the ledger's, and with no
  file on disk that the command does not own.
- **Atomic per input**: ``group()`` stages an input's files in a hidden folder inside
  ``--out`` and moves them into place only when all of them were written; a failure in the
  middle leaves none of them.
- **No litter**: a folder the command created and left empty is removed by ``close()``, with
  the parent folders it created for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from casam_core.errors import InputError

LEDGER_NAME = ".casam-outputs.json"
LEDGER_FORMAT = "casam-outputs"
STAGING_PREFIX = ".casam-staging-"
# Files whose presence marks a folder as something casam must never write derived files into.
PROTECTED_MARKERS = {"bundle.json": "a casam bundle", "manifest.json": "a casam export (engines folder)"}


class OutputDir:
    """The ``--out`` folder of one command run; see the module docstring for the rules."""

    def __init__(self, path: os.PathLike | str, command: str, overwrite: bool = False,
                 reserved: Iterable[str] = (), option: str = "--out", error: type[Exception] = InputError) -> None:
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.option = option
        self.error = error
        self.reserved = frozenset(reserved) | {LEDGER_NAME}
        self._chosen: set[str] = set()
        self._lock = threading.Lock()
        self._created: list[Path] = []  # folders ensure() made, deepest first
        self._owned: dict[str, str] = {}

    # ----- claim -------------------------------------------------------------------------
    def claim(self) -> "OutputDir":
        """Refuse a folder this command may not write into; cheap, so call it before any work."""
        p = self.path
        for existing in (p, *p.parents):
            if existing.exists():
                if not existing.is_dir():
                    where = "" if existing == p else f" ({existing} is a file)"
                    raise self.error(f"{self.option} {p} is a file{where}; give a folder")
                break
        if not p.is_dir():
            return self
        for marker, what in PROTECTED_MARKERS.items():
            if (p / marker).exists():
                raise self.error(f"{self.option} {p} is {what} ({marker}); write outputs to another folder")
        self._owned = self._read_ledger()
        foreign = sorted(name for name in self._listing() if name not in self._owned)
        if foreign and not self.overwrite:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise self.error(f"{self.option} {p} holds files that {self.command} did not write "
                             f"({', '.join(foreign[:3])}{more}); pass --overwrite to write into it anyway")
        return self

    def _listing(self) -> list[str]:
        return [e.name for e in self.path.iterdir() if e.name != LEDGER_NAME and not e.name.startswith(STAGING_PREFIX)]

    def _read_ledger(self) -> dict[str, str]:
        """Names recorded as this folder's casam outputs; an unreadable ledger owns nothing."""
        try:
            data = json.loads((self.path / LEDGER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("format") == LEDGER_FORMAT else None
        if not isinstance(files, dict):
            return {}
        return {str(k): str(v) for k, v in files.items() if isinstance(k, str) and _plain_name(k)}

    # ----- names -------------------------------------------------------------------------
    def may_write(self, name: str) -> bool:
        """True when ``name`` is free in the folder, or a file this command wrote before."""
        target = self.path / name
        if not (target.exists() or target.is_symlink()):
            return True
        return self._owned.get(name) == self.command or self.overwrite

    def allocate(self, stem: str, suffixes: Sequence[str]) -> str:
        """A stem, ``stem`` or ``stem_K``, whose names ``stem + suffix`` are all free.

        Free means: not given to an earlier input of this run, not reserved for the run's
        summaries (nor the ledger), and not a file on disk that this command does not own. A
        stem that looks like a staging folder's name gets a leading ``_``."""
        if stem.startswith(STAGING_PREFIX):
            stem = "_" + stem
        with self._lock:
            for k in range(0, 1_000_000):
                candidate = stem if k == 0 else f"{stem}_{k}"
                names = [candidate + s for s in suffixes]
                if any(n in self._chosen or n in self.reserved for n in names):
                    continue
                if self.path.is_dir() and not all(self.may_write(n) for n in names):
                    continue
                self._chosen.update(names)
                return candidate
        raise self.error(f"no free output name for {stem!r} in {self.path}")  # pragma: no cover

    def reserve(self, name: str) -> str:
        """Claim one fixed name (a run summary) for this run; refuse it when it is not ours."""
        with self._lock:
            if self.path.is_dir() and not self.may_write(name):
                raise self.error(f"{self.option} {self.path} already holds {name}, which {self.command} did not "
                                 "write; pass --overwrite or choose another folder")
            self._chosen.add(name)
            return name

    # ----- writing -----------------------------------------------------------------------
    def ensure(self) -> Path:
        """The folder, created (with its parents) on first use."""
        if not self.path.is_dir():
            missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = missing
        return self.path

    @contextmanager
    def group(self) -> Iterator[Path]:
        """A staging folder; files written into it appear in ``--out`` together, or not at all.

        Names are checked when they are moved in, so a staged file that would replace a file
        this command does not own is refused and nothing of the group appears."""
        self.ensure()
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
        try:
            yield staging
            self._commit(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path) -> None:
        names = sorted(p.name for p in staging.iterdir())
        with self._lock:
            refused = [n for n in names if not _plain_name(n) or not self.may_write(n)]
            if refused:
                raise self.error(f"{self.option} {self.path}: will not replace {', '.join(refused[:3])}, "
                                 f"which {self.command} did not write; pass --overwrite")
            for name in names:
                os.replace(staging / name, self.path / name)
                self._owned[name] = self.command
            self._write_ledger()

    def _write_ledger(self) -> None:
        data = {"format": LEDGER_FORMAT, "version": 1, "files": dict(sorted(self._owned.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".casam-ledger-", dir=self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, self.path / LEDGER_NAME)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """One file on its own, atomically (e.g. a run summary)."""
        with self.group() as staging:
            (staging / name).write_bytes(data)
        return self.path / name

    def close(self) -> None:
        """Remove the folder again if this run created it and wrote nothing into it, with the
        parent folders it created for it (a refused run leaves no empty folders behind)."""
        if not self._created or not self.path.is_dir() or self._listing():
            return
        (self.path / LEDGER_NAME).unlink(missing_ok=True)
        for folder in self._created:  # deepest first; stops at one that holds something
            try:
                folder.rmdir()
            except OSError:
                return
        self._created = []


def _plain_name(name: str) -> bool:
    """A single path component: no separators, no ``..``, not hidden staging."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name


def refuse_existing(path: os.PathLike | str, overwrite: bool, option: str = "--out",
                    error: type[Exception] = InputError, what: Optional[str] = None) -> Path:
    """The one rule for single-file writers (``pack --out``, ``keygen --out``): an existing
    file is not replaced without ``--overwrite``, and a casam bundle or manifest never is."""
    p = Path(path)
    if p.name in PROTECTED_MARKERS and p.exists():
        raise error(f"{option} {p} is {PROTECTED_MARKERS[p.name]}'s {p.name}; choose another file name")
    if p.is_dir():
        raise error(f"{option} {p} is a folder; give a file name")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise error(f"{option} {p} exists{' (' + what + ')' if what else ''}; pass --overwrite to replace it")
    return p
