"""MONAI Label's infer ``params`` → casam prompts per slice, with the voxel axis order pinned.

What a MONAI Label viewer sends (read from MONAI Label 0.8.5, plugins/slicer/MONAILabel/
MONAILabel.py and monailabel/scribbles/transforms.py):

- ``foreground`` / ``background``: ``[[i, j, k], …]``. 3D Slicer computes each from a
  control point's RAS position with the volume's ``RASToIJK`` matrix, rounded: **IJK voxel
  indices in the file's own array order**, the order nibabel's ``get_fdata()[i, j, k]``
  and ITK use (Slicer's IJK→RAS of a NIfTI is the file's affine). casam reads a NIfTI in
  that same order (``Scan.data[i, j, k]``), so a click is the voxel ``data[i, j, k]``.
- ``roi``: six numbers ``[i0, i1, j0, j1, k0, k1]`` (Slicer's ``getROIPointsXYZ`` zips the
  rounded IJK of the ROI's min and max corners, axis by axis; MONAI's scribbles transform
  indexes ``[i0:i1, j0:j1, k0:k1]``). Each pair is sorted, since RAS→IJK may flip an axis.
  (MONAI Label's SAM2 task reads ``[i0, j0, i1, j1, k0, k1]`` instead; casam follows what
  Slicer sends.)

A volume session slices along ``axis`` (2 by default: slice k is ``data[:, :, k]``, an
image whose rows are i and columns j). So a click's slice is its coordinate on ``axis``
and its pixel is ``x`` = the later remaining axis (j), ``y`` = the earlier one (i). A 2-D
picture is ``[x, y]`` (column, row), as MONAI's picture loader reads it transposed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from casam_core.errors import InputError
from casam_core.names import check_label_name

#: What the label reply can be written as; Slicer asks for ".nrrd", which casam answers
#: with NIfTI (SimpleITK in Slicer reads either; the reply's file name says which it is).
EXTENSIONS = (".nii.gz", ".nii")
DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
MAX_POINTS = 1024  # clicks in one request; a viewer sends a handful


@dataclass(frozen=True)
class Click:
    x: float
    y: float
    positive: bool


@dataclass
class SlicePrompt:
    """What one slice gets: a box (from a ROI) and the clicks on it, in request order."""

    box: Optional[tuple[float, float, float, float]] = None
    clicks: list[Click] = field(default_factory=list)


@dataclass(frozen=True)
class MonaiRequest:
    """The infer params casam acts on; everything else a viewer sends is ignored."""

    label: Optional[str]
    foreground: tuple[tuple[int, ...], ...]
    background: tuple[tuple[int, ...], ...]
    roi: Optional[tuple[int, int, int, int, int, int]]
    result_extension: str = ".nii.gz"
    result_dtype: str = "uint8"
    propagate: bool = False


def _voxels(value: Any, key: str) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_POINTS:
        raise InputError(f"params.{key} must be a list of at most {MAX_POINTS} [i, j, k] voxel points")
    out = []
    for p in value:
        if not isinstance(p, list) or len(p) not in (2, 3) or not all(_number(v) for v in p):
            raise InputError(f"params.{key}: each point is [i, j, k] (or [x, y] on a picture), got {p!r}")
        out.append(tuple(int(round(float(v))) for v in p))
    return tuple(out)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _roi(value: Any) -> Optional[tuple[int, int, int, int, int, int]]:
    if value in (None, []):
        return None
    if not isinstance(value, list) or len(value) != 6 or not all(_number(v) for v in value):
        raise InputError(f"params.roi must be 6 voxel numbers [i0, i1, j0, j1, k0, k1], got {value!r}")
    v = [int(round(float(x))) for x in value]
    pairs = [sorted(v[a:a + 2]) for a in (0, 2, 4)]
    return tuple(x for pair in pairs for x in pair)  # type: ignore[return-value]


def parse_params(text: Optional[str]) -> MonaiRequest:
    """The multipart ``params`` field (JSON text) → a checked ``MonaiRequest``."""
    try:
        data = json.loads(text or "{}")
    except ValueError as exc:
        raise InputError(f"params is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError("params must be a JSON object")
    label = data.get("label")
    if label is not None:
        check_label_name(label)
    ext = data.get("result_extension") or ".nii.gz"
    if not isinstance(ext, str):
        raise InputError("params.result_extension must be a string such as .nii.gz")
    ext = ext if ext in EXTENSIONS else ".nii.gz"  # .nrrd, .seg.nrrd: answered as NIfTI (the name says so)
    dtype = data.get("result_dtype") or "uint8"
    if dtype not in DTYPES:
        raise InputError(f"params.result_dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return MonaiRequest(label, _voxels(data.get("foreground"), "foreground"),
                        _voxels(data.get("background"), "background"), _roi(data.get("roi")),
                        ext, dtype, _truthy(data.get("propagate", False)))


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes"))


def voxel_axes(axis: Optional[int]) -> tuple[Optional[int], int, int]:
    """(slice axis, row axis, column axis) of a voxel index: a volume sliced along ``axis``
    shows the two other axes in order as rows (y) and columns (x); a picture's ``[x, y]``
    has no slice axis."""
    if axis is None:
        return None, 1, 0
    rows, cols = (a for a in range(3) if a != axis)
    return axis, rows, cols


def slice_prompts(request: MonaiRequest, axis: Optional[int]) -> dict[int, SlicePrompt]:
    """Clicks grouped by slice, in pixel (x, y); the ROI's box on its prompt slice (the
    middle of a 3-D ROI's range). Bounds are checked by the session, which names them."""
    k_axis, rows, cols = voxel_axes(axis)
    plan: dict[int, SlicePrompt] = {}
    for points, positive in ((request.foreground, True), (request.background, False)):
        for p in points:
            if len(p) != (2 if axis is None else 3):
                raise InputError(f"point {list(p)} has {len(p)} numbers; this session needs "
                                 f"{'[x, y]' if axis is None else '[i, j, k]'}")
            k = 0 if k_axis is None else p[k_axis]
            plan.setdefault(k, SlicePrompt()).clicks.append(Click(float(p[cols]), float(p[rows]), positive))
    box = roi_box(request, axis)
    if box is not None:
        k, xyxy = box
        plan.setdefault(k, SlicePrompt()).box = xyxy
    return plan


def roi_range(request: MonaiRequest, axis: Optional[int]) -> Optional[tuple[int, int]]:
    """The ROI's slice range (first, last) along the session's axis, or None."""
    if request.roi is None or axis is None:
        return None
    return request.roi[2 * axis], request.roi[2 * axis + 1]


def roi_box(request: MonaiRequest, axis: Optional[int]) -> Optional[tuple[int, tuple[float, float, float, float]]]:
    """(prompt slice, box x0 y0 x1 y1) of the ROI: the box spans its row and column ranges
    (MONAI's half-open ``[a0:a1]``); the prompt slice is the middle of its slice range."""
    if request.roi is None:
        return None
    _, rows, cols = voxel_axes(axis)
    r = request.roi
    box = (float(r[2 * cols]), float(r[2 * rows]), float(r[2 * cols + 1]), float(r[2 * rows + 1]))
    span = roi_range(request, axis)
    return (0 if span is None else (span[0] + span[1]) // 2), box
