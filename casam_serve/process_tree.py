"""The processes below a process, read from /proc: what casam-serve must not leave behind.

Triton runs as a child of casam-serve and starts one Python-backend stub per model
instance; a stub still unloading when Triton's exit timeout ends is orphaned. Listing the
tree before stopping and ending its survivors after keeps SIGTERM from leaving any behind.
A process is named by pid and start time, since a pid is reused once its process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); OSError when gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> dict[int, str]:
    """pid → start time of every live process below ``pid``; empty where there is no /proc."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                fields = _stat(entry)
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    """Whether the process that started at ``start`` still runs as ``pid`` (a zombie has exited)."""
    try:
        fields = _stat(pid)
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def end_survivors(processes: dict[int, str], grace_s: float, log: logging.Logger) -> list[int]:
    """Wait up to ``grace_s`` for ``processes`` to exit, then SIGKILL the ones left; their pids."""
    deadline = time.monotonic() + grace_s
    while any(alive(p, s) for p, s in processes.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = []
    for pid, start in processes.items():
        if alive(pid, start):
            log.warning("casam-serve: process %d outlived Triton's shutdown; killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:  # it exited meanwhile
                pass
    return killed
