"""A label volume as NIfTI on the source's grid: shape, affine and qform/sform codes kept,
uint8 labels, gzip-compressed, so it overlays the input in any viewer."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from casam_core.errors import InputError
from casam_core.files import atomic_write_bytes
from casam_core.optional import optional_import
from casam_io.scan import Scan


def nifti_mask(scan: Scan, labels: np.ndarray) -> Any:
    """A uint8 label image on the input's grid: NIfTI input keeps its header (qform and
    sform with their codes); DICOM input gets its scanner affine as both."""
    nib = optional_import("nibabel", "medical", "writing a NIfTI mask", InputError)
    if scan.header is not None and isinstance(scan.header, nib.Nifti1Header):
        header = scan.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        return nib.Nifti1Image(labels, None, header=header)  # affine None: qform and sform come from the header
    if scan.affine is None:
        raise InputError(f"{scan.path} has no geometry; cannot write a NIfTI mask for it")
    image = nib.Nifti1Image(labels, scan.affine)
    image.set_qform(scan.affine, code=1)
    image.set_sform(scan.affine, code=1)
    return image


def nifti_gz_bytes(image: Any) -> bytes:
    """A NIfTI image as .nii.gz bytes that depend on the image alone: the gzip header's MTIME
    is 0 (``gzip.compress`` stamps the current time otherwise) and no file name is stored, so
    two writes of the same labels, a casam-infer output and a casam-label download, are
    byte-identical (nibabel's own ``DeterministicGzipFile`` makes the same choice)."""
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_nifti_mask(path: Path, scan: Scan, labels: np.ndarray) -> None:
    """A .nii.gz is the deterministic gzip of the single-file .nii bytes; written atomically."""
    atomic_write_bytes(path, nifti_gz_bytes(nifti_mask(scan, labels)))
