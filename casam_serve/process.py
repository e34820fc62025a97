"""A casam-serve in a child process: start it on free ports, wait until ready, stop it.

Tests, benchmarks and scripts need a real server (the Triton binary, its stubs, our model
process) without leaking it when they fail, so the child gets its own session and a log
file, and ``stop`` ends the whole group if SIGTERM alone is not enough.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from casam_core.local_server import ServerStartError, answers, free_port, wait_until_ready
from runtime.wire import INFO_MODEL_NAME, MODEL_NAME


class ServerProcess:
    """``python -m casam_serve --engines …`` on loopback with ephemeral ports."""

    def __init__(self, engines: os.PathLike | str, *, host: str = "127.0.0.1", max_batch: int = 8,
                 instances: Optional[int] = None, backend: str = "ort-cpu", extra_args: Sequence[str] = ()) -> None:
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = free_port(host), free_port(host), free_port(host)
        self.args = [sys.executable, "-m", "casam_serve", "--engines", str(engines), "--host", host,
                     "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                     "--metrics-port", str(self.metrics_port), "--max-batch", str(max_batch),
                     "--backend", backend, *(["--instances", str(instances)] if instances else []), *extra_args]
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._log = tempfile.NamedTemporaryFile(prefix="casam-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 180.0, wait_for: Sequence[str] = (f"models/{INFO_MODEL_NAME}", f"models/{MODEL_NAME}")
              ) -> "ServerProcess":
        """Start the server and return once every readiness path in ``wait_for`` answers 200
        (``models/<m>`` for a model, ``health`` for Triton's own readiness), or raise, stopped."""
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            wait_until_ready(self.process, lambda: all(self._ready(path) for path in wait_for), "casam-serve",
                             timeout_s, self.log_tail)
        except ServerStartError:
            self.close()
            raise
        return self

    def stop(self, timeout_s: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL to the whole process group after ``timeout_s``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and delete its log file."""
        self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def _ready(self, path: str) -> bool:
        return answers(f"{self.http_url}/v2/{path}/ready", timeout_s=2)

    def _kill_group(self) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
