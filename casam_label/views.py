"""A session's slices and labels as 8-bit PNGs, for a viewer to draw under and over the masks.

Along the session's own axis the slice is the one the engines see (``SessionSource.image``:
the export's recorded intensity handling, bit-identical to casam-infer's), so what the
annotator looks at is what the model segments. Any other axis, or an explicit
``center``/``width`` window, is windowed here from the scan's raw values with the same
window function (``casam_io.intensity.apply_window``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from casam_core.errors import InputError
from casam_io.image_io import slice_at
from casam_io.intensity import apply_window
from casam_io.writers.png import png_bytes
from runtime.sessions import Session


def _check(session: Session, axis: Optional[int], k: Optional[int]) -> tuple[Optional[int], int]:
    """(axis, slice) checked against the session's data; a 2-D image has axis None, slice 0."""
    source = session.source
    if not source.is_volume:
        if axis not in (None, 0, 2) or k not in (None, 0):
            raise InputError("a 2-D image has one slice: leave axis and slice out (or slice=0)")
        return None, 0
    axis = source.axis if axis is None else axis
    if not 0 <= axis < 3:
        raise InputError(f"axis {axis} does not exist in a 3-D volume (0, 1 or 2)")
    n = source.shape[axis]
    k = n // 2 if k is None else k
    if not 0 <= k < n:
        raise InputError(f"slice {k} does not exist: the volume has slices 0..{n - 1} along axis {axis}")
    return axis, int(k)


def _window(center: Optional[float], width: Optional[float]) -> Optional[tuple[float, float]]:
    if center is None and width is None:
        return None
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        raise InputError("a window needs both center and width, finite, with width > 0")
    return center - width / 2.0, center + width / 2.0


def slice_png(session: Session, axis: Optional[int] = None, k: Optional[int] = None,
              center: Optional[float] = None, width: Optional[float] = None) -> bytes:
    """Slice k along ``axis`` as an 8-bit grey (or, for a picture, RGB) PNG."""
    axis, k = _check(session, axis, k)
    window, source = _window(center, width), session.source
    if axis is None:
        image = source.image(0) if window is None else apply_window(source.scan.data, window)
    elif axis == source.axis and window is None:
        image = source.image(k)
    else:
        assert source.slices is not None
        raw = slice_at(source.scan.data, k, axis)
        image = apply_window(raw, window if window is not None else source.slices.window, source.scan.source.invert)
    return png_bytes(np.ascontiguousarray(image))


def labels_png(session: Session, axis: Optional[int] = None, k: Optional[int] = None) -> bytes:
    """The label map's slice k along ``axis``: an 8-bit PNG whose values are label indices."""
    axis, k = _check(session, axis, k)
    labels = session.label_map()
    plane = labels if axis is None else slice_at(labels, k, axis)
    return png_bytes(np.ascontiguousarray(plane))
