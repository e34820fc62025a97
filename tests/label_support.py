"""A real casam-label process for the suite and the benchmarks: ``python -m casam_label`` on
a free loopback port, waited for until ``/ready`` answers (the engines load in the
background), stopped with SIGTERM on the way out, whatever happened meanwhile."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from casam_core.local_server import answers, free_port, stop, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
#: The engines load in the background and /ready says when: a deadline for a slow, busy
#: 2-core CI machine, not a timing.
READY_WAIT_S = 300


@contextlib.contextmanager
def label_server(engines: Path, log: Path, args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                 headers: Optional[Mapping[str, str]] = None, cwd: Path = ROOT) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of casam-label on ``engines`` with ``args``, its output in ``log``;
    ``env`` is added to this process's environment, ``headers`` go with the /ready probe."""
    port = free_port()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, **(env or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "casam_label", "--engines", str(engines), "--host", "127.0.0.1",
                                    "--port", str(port), "--backend", "ort-cpu", *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, lambda: answers(f"{url}/ready", headers), "casam-label", READY_WAIT_S,
                         lambda: log.read_text(errors="replace"))
        yield url, process
    finally:
        stop(process, timeout_s=60)
