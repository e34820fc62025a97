"""Reading images as numpy arrays, whatever their mode: the one reader trainer and runtime share.

Real medical files are messy: 16-bit greyscale PNG/TIFF, palette PNGs, RGBA screenshots,
multi-page TIFFs. Everything is returned as an H×W or H×W×C array in its native dtype;
scaling to 0–255 is ``runtime.preprocess.to_rgb_255``'s job, so training and inference
agree. DICOM (pydicom) and NIfTI slices (nibabel) are optional extras.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import InputError

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: PathLike) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


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


def read_pil(path: PathLike, palette_indices: bool = False) -> np.ndarray:
    """Pillow-readable file → array. ``palette_indices`` keeps a palette image's indices
    (label maps are often saved as palette PNGs) instead of converting to RGB."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist")
    try:
        with Image.open(p) as img:
            img.load()
            if palette_indices and img.mode == "P":
                return np.asarray(img)
            return _pil_to_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {p} is unreadable or corrupt ({exc})") from exc


def read_dicom(path: PathLike) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:
        raise InputError("reading DICOM needs pydicom: pip install 'casam[medical]'") from exc
    try:
        ds = pydicom.dcmread(str(path))
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad files
        raise InputError(f"DICOM file {path} is unreadable ({exc})") from exc
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    if slope != 1.0 or intercept != 0.0:
        array = array.astype(np.float32) * slope + intercept
    if array.ndim == 3 and array.shape[-1] not in (3, 4):  # multi-frame: first frame
        array = array[0]
    return array


def read_nifti_volume(path: PathLike) -> np.ndarray:
    """A NIfTI file's voxels in their stored dtype (the trainer's volumes and the runtime's slices)."""
    try:
        import nibabel as nib
    except ImportError as exc:
        raise InputError("reading NIfTI needs nibabel: pip install 'casam[medical]'") from exc
    try:
        return np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise InputError(f"NIfTI file {path} is unreadable ({exc})") from exc


def read_nifti_slice(path: PathLike, index: Optional[int] = None, axis: int = 2) -> np.ndarray:
    """One 2-D slice of a NIfTI volume (the middle one when ``index`` is None)."""
    volume = read_nifti_volume(path)
    if volume.ndim == 2:
        return volume
    if volume.ndim != 3:
        volume = volume.reshape(volume.shape[:3] + (-1,))[..., 0]
    n = volume.shape[axis]
    k = n // 2 if index is None else index
    if not 0 <= k < n:
        raise InputError(f"slice {k} is outside {path}, which has {n} slices along axis {axis}")
    return np.take(volume, k, axis=axis)


def read_image(path: PathLike, nifti_slice: Optional[int] = None) -> np.ndarray:
    """Any supported file → H×W or H×W×C array in its native dtype."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image {p} does not exist")
    if is_nifti(p):
        return read_nifti_slice(p, nifti_slice)
    if is_dicom(p):
        return read_dicom(p)
    return read_pil(p)
