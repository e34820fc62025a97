"""glibc heap settings around onnxruntime session loads, so freed load buffers leave the process.

Loading a graph allocates its weights more than once: the ONNX protobuf, the session's
initialisers, and the copies the CPU graph optimiser makes (NCHWc-reordered convolution
weights). The ones freed afterwards are single buffers of a few MB, which glibc serves from
its heap once its dynamic mmap threshold has risen (up to 32 MB), and a freed heap block is
kept by the process. For EfficientViT-SAM L0 (a 123 MB encoder) that kept 150 MB of freed
load buffers resident for the life of ``casam-infer`` (ad hoc, bench/encoder_variants.py).

So while a session loads (``loading``), the mmap threshold is ``LOAD_MMAP_THRESHOLD``: every
allocation that size or more is its own mapping, returned to the system when freed; and
``malloc_trim`` afterwards returns what smaller freed blocks left at the heap's top. After
the load the thresholds go to ``STEADY_MMAP_THRESHOLD`` (and twice that for trimming), about
where glibc's dynamic threshold would have settled: a mapping per allocation would make
every image's multi-MB arrays page-fault afresh (preprocess 10 → 19 ms per 1024² image, ad hoc).
onnxruntime's arena takes its tensor memory in large chunks and keeps them either way. An
operator's own ``MALLOC_MMAP_THRESHOLD_`` wins; on other C libraries (musl, macOS) nothing
is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Any, Iterator, Optional

#: glibc's mallopt parameter numbers (malloc.h: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: While loading, allocations of this size or more get their own mapping.
LOAD_MMAP_THRESHOLD = 1 << 20
#: Afterwards: glibc's largest dynamic mmap threshold (32 MiB on 64-bit), trimming at twice it.
STEADY_MMAP_THRESHOLD = 32 << 20
#: A server's steady threshold instead (``server_heap``).
SERVER_MMAP_THRESHOLD = 1 << 20

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # {"libc": CDLL or None, "tunable": bool, "steady": a server's threshold}


def _libc() -> Optional[Any]:
    """glibc, or None where this is not Linux or the C library lacks mallopt/malloc_trim."""
    if "libc" not in _STATE:
        libc = None
        if sys.platform.startswith("linux"):
            try:
                candidate = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc = candidate if hasattr(candidate, "mallopt") and hasattr(candidate, "malloc_trim") else None
            except OSError:
                libc = None
        _STATE["libc"] = libc
    return _STATE["libc"]


def _tunable() -> Optional[Any]:
    """glibc when this process may set its thresholds (no operator setting), else None."""
    with _LOCK:
        if "tunable" not in _STATE:
            _STATE["tunable"] = _libc() is not None and not os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return _libc() if _STATE["tunable"] else None


def server_heap(arenas: int = 2, mmap_threshold: int = SERVER_MMAP_THRESHOLD) -> bool:
    """A long-running server's heap: at most ``arenas`` malloc arenas (unless MALLOC_ARENA_MAX
    is set), and from now on buffers of ``mmap_threshold`` bytes or more in mappings of their
    own (unless MALLOC_MMAP_THRESHOLD_ is set); True when anything was applied.

    Every request thread of a server gets an arena of its own, and freed engine buffers stay
    in it; and a session's per-interaction arrays (slices, embeddings, masks) freed into the
    heap fragment it, so an annotation server kept growing after warm-up. With 8 concurrent
    annotators: BENCHMARKS.md, "bench/interactive_latency.py", the load table. The cost is a
    fresh page fault for each multi-MB array (an image's preprocessing, not a click's
    decoder). casam-label calls this at start.
    """
    libc = _libc()
    if libc is None:
        return False
    applied = False
    if not os.environ.get("MALLOC_ARENA_MAX"):
        applied = bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    if _tunable() is not None:
        with _LOCK:
            _STATE["steady"] = int(mmap_threshold)
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) or applied
    return applied


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Around one session load: freed load buffers leave the process (see the module doc)."""
    libc = _tunable()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            steady = _STATE.get("steady", STEADY_MMAP_THRESHOLD)
            libc.mallopt(M_MMAP_THRESHOLD, steady)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * steady)
