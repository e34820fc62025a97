"""The ``Scan``: one file's raw values with the geometry a mask must keep.

It has a module of its own because every reader returns one and every mask writer takes
one; the readers (``casam_io.image_io`` for pictures, ``casam_io.volume_io`` for NIfTI and
DICOM) import it from here instead of from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from casam_core.files import PathLike
from casam_core.errors import InputError
from casam_io.intensity import Source



def check_pixels(width: int, height: int, max_pixels: Optional[int], path: PathLike) -> None:
    """One line for an image over the limit (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(f"{path}: image {width}×{height} exceeds the {max_pixels}-pixel limit (--max-pixels)")


@dataclass
class Scan:
    """A file's raw values, in the dtype it stores (float after a DICOM rescale).

    ``data`` is H×W or H×W×3 for 2-D files, X×Y×Z for volumes (slices along any axis).
    ``affine`` maps voxel indices to RAS millimetres; ``header`` is the NIfTI header (to
    write a mask with the same qform/sform); ``datasets`` are a DICOM series' headers in
    slice order (to reference them from a DICOM SEG).
    """

    path: Path
    data: np.ndarray
    source: Source
    affine: Optional[np.ndarray] = None
    header: Any = None
    datasets: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_volume(self) -> bool:
        return self.source.kind == "volume"


def standard_channels(image: np.ndarray) -> np.ndarray:
    """Any H×W or H×W×C array → H×W (grey) or H×W×3, alpha dropped, no copy where possible."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 2):  # grey, grey + alpha
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise InputError(f"expected an H×W or H×W×C image, got shape {array.shape}")
    if array.size == 0:
        raise InputError(f"image is empty (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    return array
