"""ONNX Runtime backend: CPU, or CUDA with the embedding kept on the GPU via IO binding.

A usable GPU is detected by creating a session with the CUDA provider and reading the
session's ``get_providers()``: ``get_available_providers()`` only says which providers the
wheel was built with (onnxruntime-gpu lists CUDA on machines without any GPU).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Collection, Mapping, Optional

import numpy as np

from runtime.backends.base import Tensor, to_numpy
from runtime.backends.ort_heap import loading
from casam_core.optional import optional_import
from casam_core.errors import CasamError, ManifestError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: Graph fusions left off on the CPU. onnxruntime's CPU SkipLayerNormalization kernel
#: (residual add fused into LayerNorm) runs slower than the Add and LayerNormalization
#: kernels it replaces (BENCHMARKS.md, "bench/ort_options.py"); the decoder has one on
#: K×4096×256.
CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion",)
ORT_DEFAULT_SEVERITY = 2  # warnings


_PROCESS_LOCK = threading.Lock()  # sessions may be opened from several threads (casam-serve)
_SHARED_ARENA: list[bool] = []  # registered once per process (onnxruntime refuses a second one)
_THREAD_POOL: dict[str, bool] = {}  # {"shared": …, "made": …}, decided once per process
#: The shared arena's first chunk (share_cpu_arena); only the pages a tensor touches count in RSS.
ARENA_FIRST_CHUNK = 64 << 20


def share_cpu_arena(ort: Any) -> None:
    """One CPU memory arena for every session of this process, registered on first use.

    Each session otherwise keeps an arena of its own, grown to that graph's peak and kept:
    the encoder's, the decoder's and each alignment layer's peaks add up although they run
    one after another. Shared, the process holds the largest one, at the same speed (ad hoc;
    BENCHMARKS.md, "Edge speed", holds the resulting peak RSS).

    Its first chunk is ``ARENA_FIRST_CHUNK``, then each growth doubles (onnxruntime's
    default strategy). From onnxruntime's default 1 MB start, an encoder's tens-of-MB
    tensors fitted none of the small early chunks and spread over the large later ones,
    touching more pages than they ever used at once; growing by exactly what is requested
    fragmented vit_b's arena instead (BENCHMARKS.md, "Edge encoders", has both).
    """
    with _PROCESS_LOCK:
        if _SHARED_ARENA:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # (max_mem: no cap, extend strategy: 0 = next power of two, first chunk, max dead bytes: default)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 0, ARENA_FIRST_CHUNK, -1))
        _SHARED_ARENA.append(True)


def use_process_thread_pool(shared: bool) -> None:
    """Choose, before this process opens its first session, how sessions get threads.

    ``False`` (the default): each session has its own pool, whose threads sleep between
    operators. ``True``: every session of the process runs on one process-wide pool whose
    threads spin between operators. That saves a wake-up per operator, and as the only pool
    its spinning takes no cores from another session's graph: a program that calls
    ``Pipeline.predict`` from one thread ran the tiny chain faster. But the spinning takes
    cores from any other thread at work meanwhile: ``casam-infer`` on a folder, which reads
    the next image and writes the last one's outputs while the chain runs, was slower
    (BENCHMARKS.md, "One thread pool per process, opt-in"), so it stays off by default.

    With the shared pool onnxruntime refuses any session in the process that asks for
    threads of its own; sessions started from ``session_options`` are fine.
    """
    with _PROCESS_LOCK:
        if _THREAD_POOL.get("made") and _THREAD_POOL["shared"] != shared:
            raise CasamError("the onnxruntime thread pool of this process is already chosen: "
                             "call use_process_thread_pool before opening any session")
        _THREAD_POOL["shared"] = shared


def session_options(ort: Any) -> Any:
    """SessionOptions for any onnxruntime session opened in a casam process, on the kind of
    thread pool ``use_process_thread_pool`` chose.

    Per-session pools have spinning off: in a chain of sessions (encoder → router → align →
    decoder) the idle pool of the graph that just ran would otherwise spin on while the
    next graph runs and take its cores (ad hoc on the AMD machine; BENCHMARKS.md, "What
    changed in the exported graphs and the session settings").
    """
    options = ort.SessionOptions()
    with _PROCESS_LOCK:
        shared = _THREAD_POOL.setdefault("shared", False)
        if shared and not _THREAD_POOL.get("made"):
            ort.set_global_thread_pool_sizes(0, 1)  # intra-op: one thread per physical core
        _THREAD_POOL["made"] = True
    if shared:
        options.use_per_session_threads = False
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _ort():
    # The plain install always brings one flavour (onnxruntime-gpu by default, see setup.py).
    return optional_import("onnxruntime", "", "casam's runtime", package="onnxruntime-gpu")


class BackendUnavailable(CasamError):
    """The requested accelerator cannot be used on this machine."""


class OrtEngine:
    """One InferenceSession. ``run`` is thread-safe: sessions are, and each call binds afresh."""

    def __init__(self, key: str, session: Any, io_binding: bool, device: str, device_id: int = 0) -> None:
        self.key = key
        self.session = session
        self.io_binding = io_binding
        self.device = device
        self.device_id = device_id
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, Tensor], keep_on_device: Collection[str] = ()) -> dict[str, Tensor]:
        if not self.io_binding:
            arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
            return dict(zip(self.output_names, self.session.run(self.output_names, arrays)))
        ort = _ort()
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.float32))
        for name in self.output_names:
            where = self.device if name in keep_on_device else "cpu"
            binding.bind_output(name, where, self.device_id if where != "cpu" else 0)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {
            name: value if name in keep_on_device else value.numpy()
            for name, value in zip(self.output_names, values)
        }


class OrtBackend:
    """``ort-cpu`` or ``ort-cuda``. ``io_binding`` defaults to on for CUDA, off for the CPU."""

    def __init__(self, name: str = "ort-cpu", device_id: int = 0, io_binding: bool | None = None,
                 log_severity: int = 3) -> None:
        if name not in ("ort-cpu", "ort-cuda"):
            raise CasamError(f"unknown onnxruntime backend {name!r}")
        self.name = name
        self.device = "cuda" if name == "ort-cuda" else "cpu"
        self.device_id = device_id
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.log_severity = log_severity
        self.providers: list[Any] = [(CUDA, {"device_id": device_id}), CPU] if self.device == "cuda" else [CPU]

    def session(self, path: Path, optimized_copy: Optional[Path] = None) -> Any:
        """An InferenceSession on ``path``; ``optimized_copy`` also saves the graph as
        onnxruntime rewrote it (fusions applied), to see what really runs."""
        ort = _ort()
        options = session_options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized_copy is not None:
            options.optimized_model_filepath = str(optimized_copy)
        options.log_severity_level = self.log_severity
        if self.device == "cpu":
            # onnxruntime's planner reuses a freed buffer only for a tensor of exactly its
            # size, and a reused buffer lives until the last tensor of its chain dies, so
            # with reuse and memory patterns on, a graph with many tensor sizes (SAM's
            # windowed and global attention) keeps one buffer per size alive, far more than
            # its live set. With both off, tensors come from the arena and go back to it when
            # they die, at the same speed (BENCHMARKS.md, "bench/ort_options.py").
            options.enable_mem_reuse = False
            options.enable_mem_pattern = False
            share_cpu_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
        try:
            with loading():  # the load's freed weight copies leave the process (ort_heap.py)
                session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers,
                                               disabled_optimizers=list(CPU_DISABLED_FUSIONS) if self.device == "cpu" else None)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception zoo for bad graphs
            raise ManifestError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0]})") from exc
        if self.device == "cuda" and CUDA not in session.get_providers():
            raise BackendUnavailable(
                f"CUDA is not usable by onnxruntime here (session providers: {', '.join(session.get_providers())})"
            )
        return session

    def load(self, key: str, path: Path) -> OrtEngine:
        return OrtEngine(key, self.session(path), self.io_binding, self.device, self.device_id)

    def to_numpy(self, value: Tensor) -> np.ndarray:
        return to_numpy(value)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "onnxruntime": _ort().__version__, "io_binding": self.io_binding,
                "providers": [p if isinstance(p, str) else p[0] for p in self.providers]}


def cuda_usable(probe: Path) -> bool:
    """Whether a CUDA session on ``probe`` (a small graph) really runs on the GPU.

    Without a GPU, onnxruntime-gpu logs several lines of CUDA library errors before it
    falls back; the probe silences them, since "no GPU" is an answer here, not an error.
    """
    ort = _ort()
    ort.set_default_logger_severity(4)
    try:
        OrtBackend("ort-cuda", log_severity=4).session(probe)
    except BackendUnavailable:
        return False
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
    return True
