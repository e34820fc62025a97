"""Reading every supported file into the array preprocessing takes: the one reader trainer
and runtime share.

Real medical files are messy: 16-bit greyscale PNG/TIFF, palette PNGs, RGBA screenshots,
DICOM with rescale slopes and inverted photometry, NIfTI volumes in any orientation.
``read_scan`` returns a file's raw values (after DICOM's RescaleSlope/Intercept) with what
decides their window (``casam_io.intensity.Source``); ``prepare`` turns a whole scan into
8-bit with the recorded intensity handling, and ``read_prepared`` gives one 2-D slice of it.
Training and inference call these same functions, so both see the same grey levels.

Pictures are refused above a pixel limit, checked on the header before any decoding, so a
decompression bomb costs nothing and a huge scan fails with one line instead of swapping.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from casam_core.errors import InputError
from casam_io.volume_io import read_dicom_file, read_dicom_series, read_nifti
from casam_io.scan import Scan, check_pixels, standard_channels
from casam_io.intensity import Intensity, Source, apply_window, find_window, nonfinite_warning, to_uint8

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: One 2-D image per file: what a folder dataset's images/ may hold.
PICTURE_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES
#: What an image set without masks may hold (an OOD set, calibration or verification images).
UNLABELLED_SUFFIXES = PICTURE_SUFFIXES + NIFTI_SUFFIXES
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: a 10000×10000 slide tile, 1.2 GB as 12-bit RGB
_PIL_LIMIT_LOCK = threading.Lock()


def is_nifti(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: PathLike) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


# ----- pictures (Pillow) -------------------------------------------------------------------
def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


def _open_header(path: Path) -> Image.Image:
    """Open lazily (header only). casam checks its own limit on the header, so Pillow's global
    one is lifted for this call only: its DecompressionBombError would otherwise fire first,
    at 2×89.5 Mpx, before we know the size."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def read_pil(path: PathLike, palette_indices: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Pillow-readable file → array, decoded once. ``palette_indices`` keeps a palette
    image's indices (label maps are often saved as palette PNGs) instead of converting to RGB."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist")
    try:
        with _open_header(p) as img:
            check_pixels(img.size[0], img.size[1], max_pixels, p)
            img.load()
            if palette_indices and img.mode == "P":
                return np.asarray(img)
            return _pil_to_array(img)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # defensive: a plugin that re-checks on load
        raise InputError(f"image {p} exceeds Pillow's decompression-bomb limit ({exc}); see --max-pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {p} is unreadable or corrupt ({exc})") from exc


# ----- any file or folder → Scan --------------------------------------------------------
def read_scan(path: PathLike, volume: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              allow_gaps: bool = False, strict_4d: bool = False) -> Scan:
    """A picture, DICOM file, DICOM series folder or NIfTI file → Scan.

    ``volume`` picks one volume of a 4-D NIfTI. Without it a 4-D file uses volume 0 with a
    warning, or is refused when ``strict_4d`` (volume mode, training).
    """

    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p, max_pixels=max_pixels, allow_gaps=allow_gaps)
    if not p.exists():
        raise InputError(f"image {p} does not exist")
    if is_nifti(p):
        return read_nifti(p, volume=volume, strict_4d=strict_4d)
    if is_dicom(p):
        return read_dicom_file(p, max_pixels=max_pixels, allow_gaps=allow_gaps)

    return Scan(p, standard_channels(read_pil(p, max_pixels=max_pixels)), Source(kind="image", pil=True))


def prepare(scan: Scan, intensity: Intensity) -> tuple[np.ndarray, list[str]]:
    """The whole scan → uint8 under ``intensity`` (one window per volume), and warnings."""
    return to_uint8(scan.data, intensity, scan.source)


def slice_at(data: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Slice ``k`` along ``axis`` as a view. Not ``np.take``: on a Fortran-ordered volume (as
    nibabel returns NIfTI voxels) ``np.take`` first copies the whole volume to C order, for
    every slice (the whole volume's bytes per slice, where the view copies nothing)."""
    return data[(slice(None),) * (axis % data.ndim) + (k,)]


def slice_of(data: np.ndarray, index: Optional[int], axis: int, what: str) -> tuple[np.ndarray, int]:
    """(slice ``index`` along ``axis`` — the middle one when None —, its index)."""
    if not -data.ndim <= axis < data.ndim:
        raise InputError(f"axis {axis} does not exist in {what}, which has shape {data.shape}")
    n = data.shape[axis]
    k = n // 2 if index is None else index
    if not 0 <= k < n:
        raise InputError(f"slice {k} is outside {what}, which has {n} slices along axis {axis}")
    return slice_at(data, k, axis), k


def read_prepared(path: PathLike, intensity: Intensity = Intensity(), index: Optional[int] = None, axis: int = 2,
                  volume: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """One 8-bit 2-D image of any file: a picture as is, a volume's slice ``index`` along
    ``axis`` (the middle one by default), windowed over the whole volume as in training."""
    return prepared_slice(read_scan(path, volume=volume, max_pixels=max_pixels), intensity, index, axis)


def prepared_slice(scan: Scan, intensity: Intensity, index: Optional[int] = None, axis: int = 2) -> tuple[np.ndarray, list[str]]:
    """``read_prepared`` for a scan already read."""
    if not scan.is_volume:
        image, warnings = prepare(scan, intensity)
        return image, scan.warnings + warnings
    window, bad = find_window(scan.data, intensity, scan.source)
    raw, _ = slice_of(scan.data, index, axis, str(scan.path))
    warnings = list(scan.warnings) + ([nonfinite_warning(bad)] if bad else [])
    return np.ascontiguousarray(apply_window(raw, window, scan.source.invert)), warnings


# ----- folders of images ------------------------------------------------------------------
def files_by_stem(folder: Path, suffixes: tuple[str, ...], folders: bool = False) -> dict[str, Path]:
    """Files (and, with ``folders``, sub-folders: DICOM series) by stem, sorted by name."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if p.name.startswith("."):
            continue
        if folders and p.is_dir():
            out.setdefault(p.name, p)
        elif p.is_file() and name.endswith(suffixes):
            stem = p.name[: -len(".nii.gz")] if name.endswith(".nii.gz") else p.stem
            out.setdefault(stem, p)
    return out


def image_files(path: PathLike, error: type[Exception] = InputError) -> dict[str, Path]:
    """The images of an image set without masks (``path/images/*`` or the images in
    ``path``: pictures, DICOM and NIfTI files) by stem, not yet read, so a caller can refuse
    a missing or empty folder before it reads anything. One listing for the trainer's unseen
    sets and the exporter's calibration and verification images; ``error`` is the caller's
    error type."""
    root = Path(path)
    folder = root / "images" if (root / "images").is_dir() else root
    if not folder.is_dir():
        raise error(f"image folder {root} does not exist")
    files = files_by_stem(folder, UNLABELLED_SUFFIXES)
    if not files:
        raise error(f"{folder} holds no images ({', '.join(UNLABELLED_SUFFIXES)})")
    return files
