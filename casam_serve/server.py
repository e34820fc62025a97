"""Starting Triton (through PyTriton) with the ``casam`` model, and stopping it cleanly.

PyTriton runs the tritonserver binary shipped in its wheel as a child process; our model
code stays in this process and Triton's Python-backend stubs forward requests to it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from casam_core.optional import optional_import
from casam_core.errors import CasamError
from runtime.pipeline import Pipeline
from runtime.wire import INFO_MODEL_NAME, MODEL_NAME
from casam_serve.model import CasamModel
from casam_serve.process_tree import descendants, end_survivors
from casam_serve.watchdog import Watchdog, shm_regions
from runtime.wire import INFO_OUTPUTS, INPUTS, OUTPUTS, TensorSpec

LOG = logging.getLogger("casam.serve")
START_ATTEMPTS = 5
#: Seconds helper processes get to exit after Triton has stopped, before they are killed.
HELPER_GRACE_S = 2.0


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # most images in one encoder run
    instances: int = 8  # Triton model instances = requests handled at once
    exit_timeout_s: int = 3  # how long Triton waits for open connections and in-flight requests on stop

    def endpoints(self) -> dict[str, str]:
        return {
            "http": f"http://{self.host}:{self.http_port}",
            "grpc": f"grpc://{self.host}:{self.grpc_port}",
            "metrics": f"http://{self.host}:{self.metrics_port}/metrics",
        }


def python_libdir_first(env: "os._Environ[str] | dict[str, str]" = os.environ) -> str:
    """Put the running interpreter's LIBDIR first on LD_LIBRARY_PATH; return that folder.

    Triton's Python-backend stub is a separate binary that loads ``libpython3.x.so`` by
    name. Where the system's libpython is another patch release than this interpreter
    (Debian's 3.11.2 beside a pyenv 3.11.7 here), the stub gets the wrong one and dies at
    start-up with ``'_thread.RLock' object has no attribute '_recursion_count'``. PyTriton
    copies this process's environment for tritonserver, so setting it here is enough.
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    if libdir and Path(libdir).is_dir():
        parts.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return libdir


def _pytriton() -> Any:
    model_config = optional_import("pytriton.model_config", "serve", "casam-serve", package="nvidia-pytriton")
    return model_config, optional_import("pytriton.triton", "serve", "casam-serve", package="nvidia-pytriton")


def _tensor(model_config: Any, spec: TensorSpec) -> Any:
    dtype = bytes if spec.dtype is np.object_ else spec.dtype
    return model_config.Tensor(name=spec.name, dtype=dtype, shape=spec.shape, optional=spec.optional)


def serve(pipeline: Pipeline, config: ServeConfig, stop: Optional[threading.Event] = None) -> None:
    """Serve ``pipeline`` as the Triton model ``casam`` until SIGINT, SIGTERM or ``stop``."""
    _pytriton()
    if config.instances < 1:
        raise CasamError(f"instances must be at least 1, got {config.instances}")
    _check_ports_free(config)
    stop = stop or threading.Event()
    restore = _stop_on_signals(stop)
    python_libdir_first()
    model = CasamModel(pipeline, config.max_batch)
    watchdog = Watchdog()  # ends Triton's tree if this process dies without stopping it (SIGKILL)
    try:
        triton = _start(model, config, stop, watchdog.pid)
        if triton is None:
            return
        try:
            endpoints = config.endpoints()
            LOG.info("casam-serve: model %r (tasks: %s; %s) listening on %s (HTTP), %s (gRPC), %s (metrics)",
                     MODEL_NAME, ", ".join(pipeline.task_names) or "none", pipeline.describe().get("backend"),
                     endpoints["http"], endpoints["grpc"], endpoints["metrics"])
            while not stop.wait(1.0):
                if not triton.is_alive():
                    raise CasamError("Triton Inference Server stopped unexpectedly; see its log above")
            LOG.info("casam-serve: stopping")
        finally:
            watchdog.stand_down()
            _stop_triton(triton)
    finally:
        watchdog.stand_down()
        model.close()
        restore()
        if model.batcher.batch_sizes:
            LOG.info("casam-serve: encoder batches (size: runs) %s", dict(sorted(model.batcher.batch_sizes.items())))


def _start(model: CasamModel, config: ServeConfig, stop: threading.Event, watchdog: Optional[int] = None) -> Any:
    """A running Triton with both models loaded, or None when asked to stop meanwhile.

    PyTriton's model instances fetch their settings from instance 0 over a Unix socket
    with a one-second budget, and Triton starts all instances at once; on a busy machine
    one of them can lose that race and fail the model load. A fresh start then succeeds,
    so a failed start is retried a few times before giving up.
    """
    model_config, triton_mod = _pytriton()
    last = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        if stop.is_set():
            return None
        triton = triton_mod.Triton(config=triton_mod.TritonConfig(
            http_address=config.host, http_port=config.http_port,
            grpc_address=config.host, grpc_port=config.grpc_port,
            metrics_address=config.host, metrics_port=config.metrics_port,
            exit_timeout_secs=config.exit_timeout_s,
        ))
        try:
            # PyTriton loads bound models one after another, in this order, after Triton
            # already answers /v2/health/ready. ``casam`` goes last, so that its readiness
            # (/v2/models/casam/ready, the documented probe) means both models can answer.
            triton.bind(model_name=INFO_MODEL_NAME, infer_func=model.info_infer, inputs=[],
                        outputs=[_tensor(model_config, s) for s in INFO_OUTPUTS],
                        config=model_config.ModelConfig(batching=False), strict=True)
            triton.bind(model_name=MODEL_NAME, infer_func=[model.infer for _ in range(config.instances)],
                        inputs=[_tensor(model_config, s) for s in INPUTS],
                        outputs=[_tensor(model_config, s) for s in OUTPUTS],
                        config=model_config.ModelConfig(batching=False), strict=True)
            triton.run()
            return triton
        except Exception as exc:  # noqa: BLE001 - PyTriton and tritonclient raise many kinds
            _stop_triton(triton, keep=watchdog)
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            LOG.warning("casam-serve: Triton start %d/%d failed: %s", attempt, START_ATTEMPTS, last)
    raise CasamError(f"Triton Inference Server did not start after {START_ATTEMPTS} attempts: {last}")


def _stop_triton(triton: Any, keep: Optional[int] = None) -> None:
    """Stop Triton, end any helper process that outlived it, then unlink the Python-backend
    shared-memory regions it leaves.

    Triton waits its exit timeout for the Python-backend stubs to unload, then exits; a stub
    still unloading then (seen under load in the test suite) was left running, orphaned, for
    longer than 10 s. So every process below this one is listed before the stop, and any
    still alive HELPER_GRACE_S after it is killed. PyTriton names the shared-memory regions
    ``/dev/shm/pytrtion<our pid>-<random>``; when the stubs' unloading is cut short nobody
    unlinks them, and every restart would leave 4 MiB or more behind in RAM-backed /dev/shm.
    ``keep``: a process to leave alone (the watchdog, during start attempts).
    """
    helpers = {pid: start for pid, start in descendants(os.getpid()).items() if pid != keep}
    triton.stop()
    end_survivors(helpers, HELPER_GRACE_S, LOG)
    for region in shm_regions(os.getpid()):
        try:
            region.unlink()
        except OSError as exc:
            LOG.warning("casam-serve: could not remove shared memory %s: %s", region, exc)


def _check_ports_free(config: ServeConfig) -> None:
    """Fail in one clear line, before Triton starts, when a port is taken."""
    for what, port in (("HTTP", config.http_port), ("gRPC", config.grpc_port), ("metrics", config.metrics_port)):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((config.host, port))
            except OSError as exc:
                raise CasamError(f"cannot listen on {config.host}:{port} for {what}: {exc.strerror or exc}") from None


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGINT and SIGTERM set ``stop`` (from the main thread only, where Python allows it)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
