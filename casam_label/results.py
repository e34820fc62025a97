"""A session's labels as a file to download, written by casam-infer's own writers.

The bytes come from the same functions casam-infer calls (``casam_io.writers``), through a
file in a private temporary folder, so a download equals casam-infer's output for the same
prompts: NIfTI on the source's grid (any volume, or a picture with geometry), DICOM SEG
referencing a DICOM source, a 0/255 PNG for a picture (one label, like casam-infer's
``<stem>_mask0.png``; several labels give a PNG of label indices).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from casam_core.errors import InputError
from casam_io.writers.nifti import write_nifti_mask
from casam_io.writers.png import png_bytes, write_mask
from casam_io.writers.seg import SegRefused, seg_refusal, write_dicom_seg
from runtime.sessions import Session

FORMATS = ("nifti", "seg", "png")


@dataclass(frozen=True)
class Download:
    data: bytes
    media_type: str
    filename: str


def _nifti(session: Session, labels: np.ndarray, folder: Path) -> Download:
    scan = session.source.scan
    if scan.affine is None and scan.header is None:
        raise InputError("this image has no geometry for a NIfTI; download format=png")
    write_nifti_mask(folder / "mask.nii.gz", scan, labels if labels.ndim == 3 else labels[:, :, None])
    return Download((folder / "mask.nii.gz").read_bytes(), "application/gzip", "mask.nii.gz")


def _seg(session: Session, labels: np.ndarray, folder: Path) -> Download:
    scan = session.source.scan
    if not scan.datasets or not session.source.is_volume:
        raise InputError("a DICOM SEG needs a DICOM volume (a series or a multi-frame file); download format=nifti")
    refusal = seg_refusal(scan)
    if refusal is not None:
        raise InputError(refusal)
    try:
        written = write_dicom_seg(folder / "mask_seg.dcm", scan, labels, session.label_names())
    except SegRefused as exc:
        raise InputError(str(exc)) from exc
    if not written:
        raise InputError("no label has a mask yet: nothing to put in a DICOM SEG")
    return Download((folder / "mask_seg.dcm").read_bytes(), "application/dicom", "mask_seg.dcm")


def _png(session: Session, labels: np.ndarray, folder: Path, label: Optional[str]) -> Download:
    if session.source.is_volume:
        raise InputError("a volume downloads as format=nifti (or seg for a DICOM source), not png")
    if label is not None:
        index = {n: i for i, n in session.label_names().items()}.get(label)
        if index is None:
            raise InputError(f"label {label!r} has no prompts in this session")
        write_mask(folder / "mask.png", labels == index)
    elif len(session.labels) <= 1:
        write_mask(folder / "mask.png", labels > 0)
    else:
        return Download(png_bytes(labels), "image/png", "labels.png")
    return Download((folder / "mask.png").read_bytes(), "image/png", "mask.png")


def download(session: Session, fmt: str, label: Optional[str] = None, work_dir: Optional[Path] = None) -> Download:
    """The label map in ``fmt`` (one of ``FORMATS``)."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    labels = session.label_map()
    with tempfile.TemporaryDirectory(prefix="casam-result-", dir=work_dir) as tmp:
        folder = Path(tmp)
        if fmt == "nifti":
            return _nifti(session, labels, folder)
        if fmt == "seg":
            return _seg(session, labels, folder)
        return _png(session, labels, folder, label)
