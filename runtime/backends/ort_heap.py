"""glibc heap settings around onnxruntime session loads, so freed load buffers leave the process.

Loading a graph allocates its weights more than once: the ONNX protobuf, the session's
initialisers, and the copies the CPU graph optimiser makes (NCHWc-reordered convolution
weights). The ones freed afterwards are single buffers of a few MB, which glibc serves from
its heap once its dynamic mmap threshold has risen (up to 32 MB), and a freed heap block is
kept by the process. For EfficientViT-SAM L0 (a 123 MB encoder) that kept 150 MB of freed
load buffers resident for the life of ``casam-infer`` (ad hoc, bench/encoder_variants.py).

A fixed mmap threshold makes every allocation of ``MMAP_THRESHOLD`` or more its own mapping,
returned to the system when freed; ``malloc_trim`` after a load returns what smaller freed
blocks left at the heap's top. onnxruntime's arena takes its tensor memory in large chunks
and keeps them, so inference pays no extra mapping per tensor. An operator's own
``MALLOC_MMAP_THRESHOLD_`` wins; on other C libraries (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Any, Optional

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
M_MMAP_THRESHOLD = -3
#: Allocations of this size or more get their own mapping (glibc's dynamic threshold starts at 128 KiB).
MMAP_THRESHOLD = 1 << 20

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # {"libc": CDLL or None, "threshold": bool}


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


def bound_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD, once per process, before the first load;
    True when it is (now or earlier) set by this function."""
    with _LOCK:
        if "threshold" not in _STATE:
            libc = _libc()
            if libc is None or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
                _STATE["threshold"] = False
            else:
                _STATE["threshold"] = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        return _STATE["threshold"]


def release_freed_heap() -> bool:
    """Return freed heap memory to the system (after a session load); True where glibc did."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
