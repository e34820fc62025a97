"""The label image a MONAI Label viewer gets back, and the multipart reply that carries it.

The image holds one label as 1 on the source's grid (MONAI's deepgrow replies hold the
requested label alone, and Slicer maps value 1 to the segment it asked for): a NIfTI with
the source's header (qform, sform and their codes) for a volume, a PNG for a picture.

The reply is what MONAI Label's own server sends (``monailabel/endpoints/infer.py``): a
``multipart/form-data`` body with a ``params`` part (JSON, no file name) and an ``image``
part whose file name the client saves the label under, so it is a fresh, safe name.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import numpy as np

from casam_io.writers.nifti import nifti_gz_bytes, nifti_mask
from casam_io.writers.png import png_bytes
from runtime.sessions import Session


def label_volume(session: Session, label: str) -> np.ndarray:
    """Label ``label``'s current masks as 1 in a uint8 array of the source's shape."""
    with session.lock:
        out = np.zeros(session.source.shape, dtype=np.uint8)
        lb = session.labels.get(label)
        if lb is None:
            return out
        view = out[None] if session.source.axis is None else np.moveaxis(out, session.source.axis, 0)
        for k, history in lb.slices.items():
            if history.current is not None:
                view[k][history.current.mask] = 1
        return out


def encode_label(session: Session, labels: np.ndarray, extension: str, dtype: str) -> tuple[bytes, str]:
    """(file bytes, extension): NIfTI on the source's grid for a volume, PNG for a picture."""
    if not session.source.is_volume:
        return png_bytes(labels * np.uint8(255)), ".png"
    image = nifti_mask(session.source.scan, labels)
    image.set_data_dtype(np.dtype(dtype))
    return (nifti_gz_bytes(image), ".nii.gz") if extension == ".nii.gz" else (image.to_bytes(), ".nii")


def multipart(params: dict[str, Any], data: bytes, filename: str) -> tuple[bytes, str]:
    """(body, content type) of a two-part reply: ``params`` JSON, then the label file."""
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
