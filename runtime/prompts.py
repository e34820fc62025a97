"""``Prompts``: one value for every prompt type, validated once against its image or volume.

A malformed box (inverted, empty, NaN, off the image) does not crash SAM: it quietly yields
a meaningless mask. So prompts are checked where they are made, against the image or
volume they belong to, with one clear InputError per problem; a box that only overhangs
the image is clipped and the clipping kept as a warning. Everything downstream (the
pipeline, the remote client and the serve wire format, ``CASAM.decode``, volume
propagation) takes a ``Prompts`` and never checks again.

A new prompt type is one field here plus its check in ``_check_image`` or
``_check_volume``.

``encode_prompts`` turns boxes and points into the decoder's (point_coords, point_labels)
pair. SAM's prompt encoder embeds a box as its two corners with labels 2 and 3, and pads a
points-only prompt with one (0, 0) point of label -1. Encoding every prompt this way gives
the decoder one input signature for boxes, points or both, which is how the exported
decoder graph takes them, and the PyTorch model uses this same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from casam_core.errors import InputError

BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PADDING = 2, 3, -1
LOW_RES = 256  # side of the decoder's low-res mask logits (SAM's mask_input size)


@dataclass(frozen=True, eq=False)
class Prompts:
    """Prompts in original pixels, checked against the image (or volume) of shape ``shape``.

    Build with ``for_image`` or ``for_volume``: both run every check once.

    - ``boxes`` K×4 x0 y0 x1 y1 (clipped to the image), ``points`` K×P×2 x y with
      ``labels`` K×P (1 foreground, 0 background): K prompts, one mask each;
    - ``mask_input`` K×1×256×256 float32 logits of a previous prediction, to correct it;
    - volumes: ``boxes`` are drawn on slice ``slice`` along ``axis``, and ``box3d`` M×6
      (x0 y0 z0 x1 y1 z1, whole slice numbers) each cover a slice range.
    """

    shape: tuple[int, ...]  # (H, W) of an image; the 3-D shape of a volume
    boxes: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    mask_input: Optional[np.ndarray] = None
    slice: Optional[int] = None
    axis: Optional[int] = None  # None for a 2-D image
    box3d: Optional[np.ndarray] = None
    warnings: tuple[str, ...] = ()

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def for_image(cls, shape: Sequence[int], boxes: Optional[np.ndarray] = None, points: Optional[np.ndarray] = None,
                  labels: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None) -> "Prompts":
        """Prompts for one H×W (or H×W×C) image: at least one box or point."""
        h, w = _image_hw(shape)
        checked, warnings = check_boxes(boxes, h, w)
        pts, lab = check_points(points, labels, h, w)
        if checked is None and pts is None:
            raise InputError("give at least one box or point prompt")
        count = _prompt_count(checked, pts)
        return cls((h, w), checked, pts, lab, check_mask_input(mask_input, count), warnings=tuple(warnings))

    @classmethod
    def for_volume(cls, shape: Sequence[int], axis: int = 2, boxes: Optional[np.ndarray] = None,
                   slice: Optional[int] = None, box3d: Optional[np.ndarray] = None,
                   points: Optional[np.ndarray] = None) -> "Prompts":
        """Prompts for a 3-D volume: boxes on slice ``slice`` (default: the middle one along
        ``axis``) and/or 3-D boxes. Each is one structure, labelled 1..K in that order."""
        dims = tuple(int(s) for s in shape)
        if len(dims) != 3:
            raise InputError(f"volume prompts need a 3-D volume, got shape {dims}")
        if not 0 <= axis < 3:
            raise InputError(f"--axis {axis} does not exist in a 3-D volume (0, 1 or 2)")
        if points is not None and np.asarray(points).size:
            raise InputError("--point is not supported for volumes; give --box with --slice, or --box3d")
        bx = _rows(boxes, 4)
        b3 = _rows(box3d, 6)
        if bx is None and b3 is None:
            raise InputError("give a prompt for the volume: --box X0 Y0 X1 Y1 with --slice K, or --box3d X0 Y0 Z0 X1 Y1 Z1")
        count = len(bx if bx is not None else []) + len(b3 if b3 is not None else [])
        if count > 255:
            raise InputError(f"{count} structures do not fit uint8 labels (at most 255)")
        depth = dims[axis]
        start = depth // 2 if slice is None else int(slice)
        _check_volume(dims, axis, bx, start, b3)
        return cls(dims, bx, slice=start, axis=axis, box3d=b3)

    # ----- what the prompts are ---------------------------------------------------------------
    @property
    def is_volume(self) -> bool:
        return self.axis is not None

    @property
    def count(self) -> int:
        """K: how many masks (structures) these prompts ask for."""
        if self.is_volume:
            return sum(len(a) for a in (self.boxes, self.box3d) if a is not None)
        return _prompt_count(self.boxes, self.points)

    @property
    def slice_hw(self) -> tuple[int, int]:
        """(H, W) of the image, or of one slice of the volume."""
        if self.axis is None:
            return self.shape[0], self.shape[1]
        h, w = (s for i, s in enumerate(self.shape) if i != self.axis)
        return h, w

    def check_image(self, image_shape: Sequence[int]) -> None:
        """Refuse an image these 2-D prompts were not made for (their checks were against it)."""
        if self.is_volume:
            raise InputError("these prompts are for a volume; a 2-D image needs Prompts.for_image")
        if _image_hw(image_shape) != self.slice_hw:
            h, w = _image_hw(image_shape)
            raise InputError(f"prompts were checked against a {self.shape[1]}×{self.shape[0]} image, "
                             f"not this {w}×{h} one")

    def encode(self, scale_xy: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
        """The decoder's (K×P'×2 point_coords, K×P' point_labels), coordinates multiplied by
        ``scale_xy`` (original pixels → the model's frame, ``Frame.scale_xy``)."""
        sx, sy = scale_xy
        boxes = None if self.boxes is None else self.boxes * np.array([sx, sy, sx, sy], np.float32)
        points = None if self.points is None else self.points * np.array([sx, sy], np.float32)
        return encode_prompts(boxes, points, self.labels)


# ----- the checks ------------------------------------------------------------------------------
def _image_hw(shape: Sequence[int]) -> tuple[int, int]:
    dims = tuple(int(s) for s in shape)
    if len(dims) not in (2, 3) or dims[0] <= 0 or dims[1] <= 0:
        raise InputError(f"expected an H×W or H×W×C image, got shape {dims}")
    return dims[0], dims[1]


def _prompt_count(boxes: Optional[np.ndarray], points: Optional[np.ndarray]) -> int:
    """K prompts: boxes and point sets pair up one to one when both are given."""
    if boxes is not None and points is not None and boxes.shape[0] != points.shape[0]:
        raise InputError(f"{boxes.shape[0]} boxes and {points.shape[0]} point sets: give one of each per prompt")
    return boxes.shape[0] if boxes is not None else (points.shape[0] if points is not None else 0)


def check_boxes(boxes: Optional[np.ndarray], height: int, width: int) -> tuple[Optional[np.ndarray], list[str]]:
    """K×4 xyxy boxes → (boxes clipped to the image, warnings). Raises on unusable boxes."""
    if boxes is None:
        return None, []
    bx = np.asarray(boxes, dtype=np.float64)
    if bx.ndim == 1 and bx.size == 4:
        bx = bx[None]
    if bx.ndim != 2 or bx.shape[1] != 4 or bx.shape[0] == 0:
        raise InputError(f"boxes must be K×4 (x0 y0 x1 y1), got shape {bx.shape}")
    warnings: list[str] = []
    clipped = bx.copy()
    for k, (x0, y0, x1, y1) in enumerate(bx):
        text = f"box #{k + 1} ({_fmt(bx[k])})"
        if not np.isfinite(bx[k]).all():
            raise InputError(f"{text} holds NaN or infinity")
        if x1 < x0 or y1 < y0:
            raise InputError(f"{text} is inverted: give x0 y0 x1 y1 with x0 < x1 and y0 < y1")
        if x1 == x0 or y1 == y0:
            raise InputError(f"{text} has zero area")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise InputError(f"{text} lies wholly outside the {width}×{height} image")
        clipped[k] = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
        if not np.array_equal(clipped[k], bx[k]):
            warnings.append(f"{text} extends past the {width}×{height} image; clipped to ({_fmt(clipped[k])})")
    return clipped.astype(np.float32), warnings


def check_points(
    points: Optional[np.ndarray], labels: Optional[np.ndarray], height: int, width: int
) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """K×P×2 points (K×2: K prompts of one point) and K×P labels (0 negative, 1 positive;
    default all positive)."""
    if points is None:
        if labels is not None:
            raise InputError("point labels were given without points")
        return None, None
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 2:
        pts = pts[:, None, :]
    if pts.ndim != 3 or pts.shape[2] != 2 or pts.shape[0] == 0 or pts.shape[1] == 0:
        raise InputError(f"points must be K×P×2 (x y), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise InputError("a point holds NaN or infinity")
    outside = (pts[..., 0] < 0) | (pts[..., 1] < 0) | (pts[..., 0] > width) | (pts[..., 1] > height)
    if outside.any():
        k, p = np.argwhere(outside)[0]
        raise InputError(f"point ({_fmt(pts[k, p])}) lies outside the {width}×{height} image")
    if labels is None:
        lab = np.ones(pts.shape[:2], dtype=np.float32)
    else:
        lab = np.asarray(labels, dtype=np.float64)
        if lab.size != pts.shape[0] * pts.shape[1]:
            raise InputError(f"{lab.size} point labels for {pts.shape[0] * pts.shape[1]} points: give one per point")
        lab = lab.reshape(pts.shape[:2])
        if not np.isin(lab, (0, 1)).all():
            raise InputError("point labels must be 0 (background) or 1 (foreground)")
    return pts.astype(np.float32), lab.astype(np.float32)


def check_mask_input(mask_input: Optional[np.ndarray], count: int) -> Optional[np.ndarray]:
    """A previous prediction's low-res logits, one K×1×256×256 (or K×256×256) per prompt."""
    if mask_input is None:
        return None
    m = np.asarray(mask_input)
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1:] != (1, LOW_RES, LOW_RES) or m.shape[0] != count:
        raise InputError(f"mask_input must be K×1×{LOW_RES}×{LOW_RES} low-res logits, one per prompt "
                         f"({count}), got shape {np.asarray(mask_input).shape}")
    if not np.issubdtype(m.dtype, np.number) or not np.isfinite(m).all():
        raise InputError("mask_input must hold finite numbers (a previous prediction's low_res_logits)")
    return m.astype(np.float32)


def _rows(values: Optional[np.ndarray], width: int) -> Optional[np.ndarray]:
    """None or empty → None; otherwise N×width float64 rows (a flat row is one)."""
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return None
    if array.ndim == 1 and array.size == width:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != width:
        raise InputError(f"expected rows of {width} numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"a {'3-D box' if width == 6 else 'box'} holds NaN or infinity")
    return array


def _check_volume(shape: tuple[int, ...], axis: int, boxes: Optional[np.ndarray], start: int,
                  box3d: Optional[np.ndarray]) -> None:
    """Each box on slice ``start`` and each 3-D box, in label order, against the volume."""
    depth = shape[axis]
    h, w = (s for i, s in enumerate(shape) if i != axis)
    first = 0 if boxes is None else len(boxes)
    for label, box in enumerate([] if boxes is None else boxes, start=1):
        _check_slice_box(label, box, start, depth, axis, h, w)
    for j, (x0, y0, z0, x1, y1, z1) in enumerate([] if box3d is None else box3d, start=1):
        if z1 < z0 or z0 != int(z0) or z1 != int(z1):
            raise InputError(f"--box3d #{j}: give whole slice numbers Z0 ≤ Z1, got {z0:g} {z1:g}")
        where = f"label {first + j}: box ({x0:g} {y0:g} {x1:g} {y1:g})"
        for name, z in (("Z0", z0), ("Z1", z1)):  # the coordinate at fault, not the middle slice
            if not 0 <= z < depth:
                raise InputError(f"{where}: slice range {z0:g}..{z1:g} is outside the volume's {depth} slices "
                                 f"({name} = {z:g}; slices are 0..{depth - 1} along axis {axis})")
        _check_slice_box(first + j, np.array([x0, y0, x1, y1]), (int(z0) + int(z1)) // 2, depth, axis, h, w)


def _check_slice_box(label: int, box: np.ndarray, start: int, depth: int, axis: int, h: int, w: int) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    where = f"label {label}: box ({x0:g} {y0:g} {x1:g} {y1:g})"
    if not 0 <= start < depth:
        raise InputError(f"{where}: slice {start} is outside the volume's {depth} slices along axis {axis}")
    if not (x1 > x0 and y1 > y0) or x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise InputError(f"{where} is outside (or empty in) slice {start}, which is {w}×{h} pixels")


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:g}" for v in values)


# ----- the decoder's form -------------------------------------------------------------------------
def encode_prompts(
    boxes: Optional[np.ndarray] = None,
    points: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """K boxes (K×4) and/or K point sets (K×P×2, labels K×P) → (K×P'×2 float32, K×P' float32).

    Layout matches segment-anything's PromptEncoder: points first, then the box corners;
    a padding point only when there is no box. Coordinates are taken as they are (already
    in the model's frame); user prompts come through ``Prompts.encode``.
    """
    if boxes is None and points is None:
        raise InputError("a prompt needs at least one box or one point")
    parts_xy: list[np.ndarray] = []
    parts_lab: list[np.ndarray] = []
    k: Optional[int] = None
    if points is not None:
        pts = np.asarray(points, dtype=np.float32)
        if pts.ndim == 2:
            pts = pts[:, None, :]
        if pts.ndim != 3 or pts.shape[2] != 2:
            raise InputError(f"points must be K×P×2, got shape {pts.shape}")
        lab = np.ones(pts.shape[:2], np.float32) if labels is None else np.asarray(labels, np.float32).reshape(pts.shape[:2])
        k = pts.shape[0]
        parts_xy.append(pts)
        parts_lab.append(lab)
    if boxes is not None:
        bx = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if k is not None and bx.shape[0] != k:
            raise InputError(f"{bx.shape[0]} boxes and {k} point sets: give one of each per prompt")
        k = bx.shape[0]
        parts_xy.append(bx.reshape(-1, 2, 2))
        parts_lab.append(np.tile(np.array([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]], np.float32), (k, 1)))
    else:
        assert k is not None
        parts_xy.append(np.zeros((k, 1, 2), np.float32))
        parts_lab.append(np.full((k, 1), PADDING, np.float32))
    return np.concatenate(parts_xy, axis=1), np.concatenate(parts_lab, axis=1)
