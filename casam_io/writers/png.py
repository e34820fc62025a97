"""Masks as single-channel 0/255 PNGs at the original image size, which any viewer or
script reads without casam."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from casam_core.files import atomic_write_bytes


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_mask(path: Path, mask: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(np.where(mask, 255, 0).astype(np.uint8)))
