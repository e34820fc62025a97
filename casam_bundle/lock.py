"""The bundle's write lock: one writer at a time, released by the kernel when its holder dies.

Every command that writes a bundle (training's commit, ``--replace``, ``unpack``,
``remove``) holds an exclusive ``fcntl.flock`` on ``<bundle>/.lock`` while it re-reads
``bundle.json``, changes the bundle and rewrites ``bundle.json``. The lock belongs to the
open file, not to a marker on disk, so a writer killed with SIGKILL releases it at once and
there is never a stale lock to clean up. The file holds the pid of the latest holder, which
is only ever used in messages.

A second writer waits (saying so once on stderr) up to ``wait`` seconds, then fails with
``BundleBusy`` ("bundle … is busy (pid N)"); ``wait=0`` fails at once. Waiting is the
default because a training run reaches its commit after hours of work, and commits take
well under a second. The lock is re-entrant within one process, so ``unpack`` can hold it
across its checks and the commit it calls.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from casam_bundle.errors import BundleError

LOCK_NAME = ".lock"
#: Default wait for a busy bundle, in seconds (``--wait``).
DEFAULT_WAIT_S = 300.0
_POLL_S = 0.05
_held: dict[str, list[int]] = {}  # resolved bundle root → [fd, depth]


class BundleBusy(BundleError):
    """Another process holds the bundle's write lock (and did not release it in time)."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _notify_stderr(message: str) -> None:
    print(f"casam: {message}", file=sys.stderr, flush=True)


def _acquire(fd: int, root: Path, wait: float, notify: Callable[[str], None]) -> None:
    if _try_lock(fd):
        return
    if wait > 0:
        notify(f"bundle {root} is busy (pid {_holder(fd)}); waiting up to {wait:g} s for it (--wait)")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            if _try_lock(fd):
                return
    raise BundleBusy(
        f"bundle {root} is busy (pid {_holder(fd)}): another command is writing it; "
        f"retry when it has finished, or give --wait SECONDS"
    )


@contextlib.contextmanager
def bundle_lock(root: Union[str, os.PathLike], wait: float = DEFAULT_WAIT_S,
                notify: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold the exclusive write lock of the bundle at ``root`` (created if needed) for the block."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    if key in _held:  # re-entered by the same process: already ours
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BundleError(f"cannot open the lock file of bundle {root} ({exc.strerror})") from exc
    try:
        _acquire(fd, root, float(wait), notify or _notify_stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
