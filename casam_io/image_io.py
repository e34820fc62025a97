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

from pathlib import Path
from typing import Optional

import numpy as np

from casam_core.files import PathLike
from casam_core.errors import InputError
from casam_io.intensity import Intensity, apply_window, find_window, nonfinite_warning, to_uint8
from casam_io.readers import DEFAULT_MAX_PIXELS, ReadOptions, read, split_suffix, suffixes
from casam_io.readers.picture import read_pil
from casam_io.scan import Scan

__all__ = ["DEFAULT_MAX_PIXELS", "DICOM_SUFFIXES", "IMAGE_SUFFIXES", "NIFTI_SUFFIXES", "PICTURE_SUFFIXES",
           "UNLABELLED_SUFFIXES", "Scan", "files_by_stem", "image_files", "prepare",
           "prepared_slice", "read_pil", "read_prepared", "read_scan", "slice_at", "slice_of"]

# The suffix tuples callers use, derived from the reader registry (casam_io/readers/).
IMAGE_SUFFIXES = suffixes("picture")
DICOM_SUFFIXES = suffixes("dicom")
NIFTI_SUFFIXES = suffixes("nifti")
#: One 2-D image per file: what a folder dataset's images/ may hold.
PICTURE_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES
#: What an image set without masks may hold (an OOD set, calibration or verification images).
UNLABELLED_SUFFIXES = PICTURE_SUFFIXES + NIFTI_SUFFIXES



def read_scan(path: PathLike, volume: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              allow_gaps: bool = False, strict_4d: bool = False) -> Scan:
    """A picture, DICOM file, DICOM series folder or NIfTI file → Scan, through the reader
    registry (``casam_io.readers``).

    ``volume`` picks one volume of a 4-D NIfTI. Without it a 4-D file uses volume 0 with a
    warning, or is refused when ``strict_4d`` (volume mode, training).
    """
    return read(path, ReadOptions(volume=volume, max_pixels=max_pixels, allow_gaps=allow_gaps, strict_4d=strict_4d))


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
            out.setdefault(split_suffix(p.name)[0], p)
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
