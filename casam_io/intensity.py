"""Intensity handling: raw scanner or file values → the 8-bit grey levels SAM is fed.

This is the one implementation both sides run: the trainer prepares every training slice
with it, and the runtime applies the window recorded in ``manifest.json`` (copied from
``bundle.json``'s ``preprocessing.intensity``) unchanged, so an edge device never sees
other intensities than the alignment layer and the VAE were trained on.

A window is found once per volume (or per 2-D image) and then applied slice by slice, so a
streamed volume and a volume windowed at once give bit-identical slices: the mapping is
element-wise, in float64, the same expression either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from casam_core.errors import InputError

# Each mode and what it does, for --help and for the error on an unknown mode.
INTENSITY_MODES: dict[str, str] = {
    "auto": "volumes: percentile window per volume; 2-D files: min-max per image (8-bit kept as is)",
    "percentile": "percentile window per volume (and per 2-D image)",
    "window": "fixed window CENTER WIDTH on the stored values (Hounsfield units for CT)",
    "dicom-voi": "the DICOM file's own VOI window (WindowCenter/WindowWidth); elsewhere as auto",
    "minmax": "min-max per slice or image (8-bit 2-D images kept as is)",
}
# Radiology's usual CT windows, (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_PERCENTILES = (0.5, 99.5)
CHUNK_ELEMENTS = 1 << 22  # float64 temporaries of at most 32 MB, however large the image


@dataclass(frozen=True)
class Intensity:
    """How raw values become 0–255; recorded in ``preprocessing.intensity``."""

    mode: str = "auto"
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    window: Optional[tuple[float, float]] = None  # (center, width), mode "window" only

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise InputError(f"unknown intensity mode {self.mode!r}; use one of {', '.join(INTENSITY_MODES)}")
        lo, hi = self.percentiles
        if not (0.0 <= lo < hi <= 100.0):
            raise InputError(f"intensity percentiles must satisfy 0 ≤ low < high ≤ 100, got {lo}, {hi}")
        if self.mode == "window":
            if self.window is None:
                raise InputError("intensity mode 'window' needs a window CENTER WIDTH")
            center, width = self.window
            if not (math.isfinite(center) and math.isfinite(width) and width > 0):
                raise InputError(f"a window needs a finite center and a width > 0, got {center}, {width}")
        elif self.window is not None:
            raise InputError(f"intensity mode {self.mode!r} takes no fixed window")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "percentiles": list(self.percentiles),
                "window": None if self.window is None else list(self.window)}

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "Intensity":
        """``None`` (a bundle or manifest written before intensity was recorded) → ``auto``,
        which is exactly how those bundles were trained."""
        if data is None:
            return cls()
        window = data.get("window")
        return cls(
            mode=str(data.get("mode", "auto")),
            percentiles=tuple(float(x) for x in data.get("percentiles", DEFAULT_PERCENTILES)),  # type: ignore[arg-type]
            window=None if window is None else (float(window[0]), float(window[1])),
        )


def intensity_from_options(mode: Optional[str], window: Optional[tuple[float, float]],
                           preset: Optional[str]) -> Optional[Intensity]:
    """CLI options (``--intensity``, ``--window C W``, ``--window-preset NAME``) → Intensity,
    or None when none was given (the bundle's recorded choice then holds)."""
    if window and preset:
        raise InputError("give --window CENTER WIDTH or --window-preset, not both")
    if preset is not None:
        if preset not in WINDOW_PRESETS:
            raise InputError(f"unknown window preset {preset!r}; use one of {', '.join(WINDOW_PRESETS)}")
        window = WINDOW_PRESETS[preset]
    if window:
        if mode not in (None, "window"):
            raise InputError(f"--window fixes the window; it cannot be combined with --intensity {mode}")
        return Intensity(mode="window", window=(float(window[0]), float(window[1])))
    return None if mode is None else Intensity(mode=mode)


@dataclass(frozen=True)
class Source:
    """What the reader knows about where values came from, which decides the window."""

    kind: str  # "image" (a 2-D file) or "volume"
    voi: Optional[tuple[float, float]] = None  # DICOM VOI window (center, width), if the file has one
    invert: bool = False  # DICOM MONOCHROME1: high values are dark
    pil: bool = False  # an ordinary picture (PNG, JPEG, TIFF…), never windowed in scanner units


def count_nonfinite(array: np.ndarray) -> int:
    """How many values are NaN or infinite (0 at once for integer data)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def finite_values(array: np.ndarray) -> tuple[np.ndarray, int]:
    """(the finite values of ``array``, how many were NaN or infinite). No copy for integers."""
    if not np.issubdtype(array.dtype, np.floating):
        return array, 0
    finite = np.isfinite(array)
    bad = int(array.size - np.count_nonzero(finite))
    return (array if bad == 0 else array[finite]), bad


def nonfinite_warning(count: int) -> str:
    return f"{count} NaN or infinite pixel(s) shown as black"


def effective_mode(intensity: Intensity, source: Source) -> str:
    """The mode actually applied to ``source``: ordinary pictures are always min-max (they
    carry no scanner units or VOI), ``dicom-voi`` without a VOI falls back to ``auto``, and
    ``auto`` is percentile for volumes and min-max for 2-D files."""
    if source.pil:
        return "minmax"
    mode = intensity.mode
    if mode == "dicom-voi" and source.voi is None:
        mode = "auto"
    if mode == "auto":
        mode = "percentile" if source.kind == "volume" else "minmax"
    return mode


def find_window(array: np.ndarray, intensity: Intensity, source: Source) -> tuple[Optional[tuple[float, float]], int]:
    """((lo, hi) raw values mapped to 0 and 255 for a whole image or volume, count of NaN or
    infinite values). A None window keeps 8-bit data as it is (today's behaviour)."""
    mode = effective_mode(intensity, source)
    if mode == "window":
        center, width = intensity.window  # type: ignore[misc]
        return (center - width / 2.0, center + width / 2.0), count_nonfinite(array)
    if mode == "dicom-voi":
        center, width = source.voi  # type: ignore[misc]
        return (center - width / 2.0, center + width / 2.0), count_nonfinite(array)
    if mode == "minmax" and array.dtype == np.uint8:
        return None, 0
    values, bad = finite_values(array)
    if values.size == 0:
        return (0.0, 1.0), bad
    if mode == "percentile":
        lo, hi = np.percentile(values, intensity.percentiles)
        return (float(lo), float(hi)), bad
    return (float(values.min()), float(values.max())), bad


def apply_window(array: np.ndarray, window: Optional[tuple[float, float]], invert: bool = False) -> np.ndarray:
    """Raw values → uint8 0–255 under ``window`` (same shape). NaN becomes 0, ±inf clips.

    Float64 arithmetic in chunks of CHUNK_ELEMENTS: the temporaries stay small for a huge
    image, and since every element is mapped alone the chunking cannot change a value.
    """
    a = np.asarray(array)
    if window is None:
        out = np.array(a, dtype=np.uint8, copy=True)
    else:
        lo, hi = window
        if not hi > lo:
            hi = lo + 1.0
        scale = 255.0 / (hi - lo)
        flat_in = a.reshape(-1)
        out = np.empty(a.shape, np.uint8)
        flat_out = out.reshape(-1)
        for start in range(0, flat_in.size, CHUNK_ELEMENTS):
            v = flat_in[start:start + CHUNK_ELEMENTS].astype(np.float64)
            v -= lo
            v *= scale
            np.rint(v, out=v)
            np.clip(v, 0.0, 255.0, out=v)
            v[np.isnan(v)] = 0.0
            flat_out[start:start + CHUNK_ELEMENTS] = v.astype(np.uint8)
    if invert:
        np.subtract(255, out, out=out)
    return out


def to_uint8(array: np.ndarray, intensity: Intensity, source: Source) -> tuple[np.ndarray, list[str]]:
    """A whole 2-D image or volume → (uint8 array of the same shape, warnings)."""
    window, bad = find_window(np.asarray(array), intensity, source)
    warnings = [nonfinite_warning(bad)] if bad else []
    return apply_window(array, window, source.invert), warnings
