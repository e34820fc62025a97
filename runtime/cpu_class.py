"""The CPU's int8 kernel class: which of onnxruntime's u8s8 integer kernels this CPU runs.

onnxruntime (through MLAS) picks its int8 GEMM kernels by CPU feature, and they differ
in arithmetic, not only in speed (oneDNN, "Nuances of int8 computations"):
- ``amx``: AMX tiles (``amx_int8``), int32 accumulation of u8×s8 products;
- ``vnni``: AVX-512 VNNI or AVX-VNNI (``avx512_vnni``, ``avx_vnni``): ``vpdpbusd``
  accumulates u8×s8 products straight into int32;
- ``avx2``: everything else (AVX2, AVX-512 without VNNI, SSE4.1): ``vpmaddubsw`` adds pairs of
  u8×s8 products into int16 with saturation, so large activations times large weights can
  overflow, and an export verified on a VNNI machine may produce other masks here.

An export records its class (manifest ``int8_kernel_class``); ``runtime.deployment`` re-runs
the export's verification set on a machine of another class. Torch-free and cheap: one read
of /proc/cpuinfo, cached.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Optional

KERNEL_CLASSES = ("amx", "vnni", "avx2")
CPUINFO = Path("/proc/cpuinfo")


def kernel_class_of(flags: Iterable[str]) -> str:
    """The int8 kernel class of a CPU with ``flags`` (/proc/cpuinfo spelling); best first.

    A CPU with none of the VNNI or AMX flags is ``avx2``: its kernels have the int16
    intermediate sums (also on SSE4.1 or non-x86 machines, which have no class of their own).
    """
    have = set(flags)
    if "amx_int8" in have:
        return "amx"
    if have & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "avx2"


def cpu_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """The first processor's flags from ``cpuinfo`` ([] where it cannot be read, e.g. macOS)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.split()
    return []


@functools.lru_cache(maxsize=1)
def int8_kernel_class(cpuinfo: Optional[Path] = None) -> str:
    """This machine's int8 kernel class (one of ``KERNEL_CLASSES``)."""
    return kernel_class_of(cpu_flags(cpuinfo or CPUINFO))
