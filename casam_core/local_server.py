"""A server this process started: a free loopback port for it, the wait until it answers,
and its stop.

casam starts servers of its own and then talks to them: casam-infer's local casam-serve
(casam_serve/process.py), and the suite's and the benchmarks' casam-label and Orthanc
(tests/label_support.py, tests/orthanc_support.py). Each needs the same loop: notice a
child that died and say so with its log (not a timeout minutes later), give up at a
deadline, and poll a readiness URL that refuses connections until the server listens. One
loop, here; each caller only says what "ready" means for its server.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping, Optional

from casam_core.errors import CasamError

#: Lines of the server's log quoted when it fails to start.
LOG_TAIL_LINES = 40


class ServerStartError(CasamError):
    """A server this process started exited, or did not answer ready before its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out as free (ephemeral); the server binds it next."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def answers(url: str, headers: Optional[Mapping[str, str]] = None, timeout_s: float = 5.0) -> bool:
    """Whether GET ``url`` answers 200 now: False while nothing listens, or while it answers
    something else (a server whose engines still load answers 503)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # HTTPError (a non-2xx answer) is a URLError
        return False


def wait_until_ready(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float,
                     log: Callable[[], str] = lambda: "", interval_s: float = 0.25) -> None:
    """Return once ``ready()`` is true; raise ServerStartError, quoting the tail of ``log()``,
    as soon as ``process`` exits or once ``timeout_s`` has passed. The caller stops it."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise ServerStartError(f"{what} exited with code {process.returncode}{_tail(log())}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} was not ready after {timeout_s:.0f} s{_tail(log())}")
        time.sleep(interval_s)


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (a clean shutdown), SIGKILL after ``timeout_s``; the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _tail(text: str) -> str:
    lines = text.splitlines()[-LOG_TAIL_LINES:]
    return "; log tail:\n" + "\n".join(lines) if lines else ""
