"""Orphan-free shutdown: a watchdog that ends casam-serve's process tree when casam-serve dies.

casam-serve stops Triton cleanly on SIGINT and SIGTERM (casam_serve/server.py). A SIGKILL,
or a supervisor's SIGTERM followed by SIGKILL after a short grace period, ends casam-serve
before it can do so: PyTriton gives tritonserver PR_SET_PDEATHSIG (SIGTERM), but Triton's
Python-backend stubs are tritonserver's children, ignore SIGTERM, and would live on with
parent 1. No death signal can be set on them, since Triton starts them.

So casam-serve starts this watchdog as its child, holding the read end of a pipe whose
write end only casam-serve holds (it is close-on-exec, so Triton never inherits it). The
watchdog keeps a list of casam-serve's descendants (pid and start time, refreshed every
SNAPSHOT_S seconds) and waits on the pipe:

- ``q`` from casam-serve: a clean stop is under way; the watchdog exits and leaves it be;
- end of file: casam-serve is gone, whatever ended it; the watchdog SIGKILLs every listed
  process still alive, unlinks PyTriton's shared-memory regions, and exits.

It ignores SIGINT and SIGTERM (a Ctrl-C or a supervisor's SIGTERM to the whole group must not
end it before casam-serve has stopped).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from casam_serve.process_tree import alive, descendants

SNAPSHOT_S = 0.5
STAND_DOWN = b"q"


def shm_regions(parent: int) -> list[Path]:
    """PyTriton's shared-memory regions of process ``parent`` (``/dev/shm/pytrtion<pid>-*``)."""
    return list(Path("/dev/shm").glob(f"pytrtion{parent}-*"))


def watch(parent: int, fd: int) -> bool:
    """Watch ``parent`` until it stands the watchdog down (False) or dies (True: its tree was ended)."""
    me = os.getpid()
    known: dict[int, str] = {}
    while True:
        known.update({pid: start for pid, start in descendants(parent).items() if pid != me})
        ready, _, _ = select.select([fd], [], [], SNAPSHOT_S)
        if ready:
            if os.read(fd, 1) == STAND_DOWN:
                return False
            break
    for pid, start in known.items():
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # it exited meanwhile
                pass
    for region in shm_regions(parent):
        region.unlink(missing_ok=True)
    return True


class Watchdog:
    """The watchdog child of this process (see the module docstring)."""

    def __init__(self) -> None:
        read, self._write = os.pipe()  # both close-on-exec: Triton inherits neither
        self.process: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
            [sys.executable, "-m", "casam_serve.watchdog", str(os.getpid()), str(read)], pass_fds=(read,),
            stdin=subprocess.DEVNULL)
        os.close(read)

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def stand_down(self, timeout_s: float = 5.0) -> None:
        """A clean stop follows: the watchdog exits without ending anything."""
        if self.process is None:
            return
        try:
            os.write(self._write, STAND_DOWN)
            self.process.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._write)
            self.process = None


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    watch(int(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
