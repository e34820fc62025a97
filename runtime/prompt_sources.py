"""Prompts for many images: a prompts file keyed by file name, or boxes derived from ground-
truth masks (which then also score the deployment).

A real folder never has its object in the same place in every image, so one ``--box`` for
all of them is only for demos. ``--prompts FILE`` gives each image or volume its own boxes,
points and slice; ``--boxes-from-masks DIR`` takes one box per structure (casam_core.structures,
the trainer's definition) from each image's mask or label volume, optionally jittered, so a
site can check an exported deployment on its own labelled cases.

JSON: ``{"scan.nii.gz": {"boxes": [[x0, y0, x1, y1]], "slice": 40}, "a.png": {"points":
[[x, y]], "point_labels": [1]}}`` (also ``"box3d": [[x0, y0, z0, x1, y1, z1]]``).
CSV: a header ``image,x0,y0,x1,y1`` (optional ``slice``), one row per box.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from casam_core.errors import InputError
from casam_io.image_io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, read_pil, read_scan
from casam_core.structures import mask_to_index_map, tight_box
from runtime.prompts import Prompts

MASK_SUFFIXES = IMAGE_SUFFIXES + NIFTI_SUFFIXES


@dataclass
class ImagePrompts:
    """One image's or volume's prompts in original pixels, and its ground truth if known
    (an H×W index map, or a label volume whose values 1..K are the structures)."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    slice: Optional[int] = None
    box3d: list[tuple[float, ...]] = field(default_factory=list)
    truth: Optional[np.ndarray] = None
    truth_values: list[int] = field(default_factory=list)  # label value of each structure, in prompt order

    def for_image(self, shape: Sequence[int]) -> Prompts:
        """These prompts, grouped as ``group_prompts`` does, checked against an image of ``shape``."""
        return Prompts.for_image(shape, *group_prompts(self.boxes, self.points, self.point_labels))

    def for_volume(self, shape: Sequence[int], axis: int, default_slice: Optional[int] = None) -> Prompts:
        """These prompts checked against a volume: boxes on ``slice`` (else ``default_slice``,
        else the middle one) and 3-D boxes."""
        return Prompts.for_volume(shape, axis, boxes=self.boxes or None,
                                  slice=self.slice if self.slice is not None else default_slice,
                                  box3d=self.box3d or None, points=self.points or None)


def group_prompts(
    box: Sequence[Sequence[float]], point: Sequence[Sequence[float]], label: Sequence[int]
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """Listed prompts (CLI options, a prompts-file entry) → (K×4 boxes, K×P×2 points, K×P labels).

    Each box is one prompt. All points form one prompt (clicks on one object, negative ones
    excluding regions), combined with the box when exactly one box is given. Shape-free, so
    casam-infer can check the CLI's prompts before it reads any image.
    """
    if not box and not point:
        raise InputError("give at least one prompt: --box X0 Y0 X1 Y1 or --point X Y")
    if label and len(label) != len(point):
        raise InputError(f"{len(label)} --label values for {len(point)} --point options: give none or one per point")
    if point and len(box) > 1:
        raise InputError("points refine a single object: combine --point with at most one --box")
    boxes = np.asarray(box, dtype=np.float32).reshape(-1, 4) if box else None
    points = np.asarray(point, dtype=np.float32)[None] if point else None
    labels = (np.asarray(label, dtype=np.float32) if label else np.ones(len(point), np.float32))[None] if point else None
    return boxes, points, labels


def _numbers(value: Any, width: int, where: str) -> list[tuple[float, ...]]:
    try:
        rows = [tuple(float(v) for v in row) for row in value]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: expected lists of {width} numbers") from exc
    if any(len(r) != width or not all(math.isfinite(v) for v in r) for r in rows):
        raise InputError(f"{where}: expected lists of {width} finite numbers")
    return rows


def _entry(name: str, data: Any, source: Path) -> ImagePrompts:
    where = f"{source} ({name})"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected an object with boxes, points, point_labels, slice or box3d")
    unknown = set(data) - {"boxes", "points", "point_labels", "slice", "box3d", "image"}
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    prompts = ImagePrompts(
        boxes=_numbers(data.get("boxes", []), 4, where + " boxes"),  # type: ignore[arg-type]
        points=_numbers(data.get("points", []), 2, where + " points"),  # type: ignore[arg-type]
        box3d=_numbers(data.get("box3d", []), 6, where + " box3d"),
    )
    labels = data.get("point_labels", [1] * len(prompts.points))
    if not isinstance(labels, list) or len(labels) != len(prompts.points) or any(v not in (0, 1) for v in labels):
        raise InputError(f"{where}: point_labels must be 0 or 1, one per point")
    prompts.point_labels = [int(v) for v in labels]
    if data.get("slice") is not None:
        if not isinstance(data["slice"], int) or data["slice"] < 0:
            raise InputError(f"{where}: slice must be a whole number ≥ 0")
        prompts.slice = data["slice"]
    return prompts


def read_prompt_file(path: Path) -> dict[str, ImagePrompts]:
    """A JSON or CSV prompts file → {file name: prompts}."""
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"prompts file {path} is not valid JSON ({exc})") from exc
    if isinstance(data, list):
        if not all(isinstance(d, dict) and isinstance(d.get("image"), str) for d in data):
            raise InputError(f"prompts file {path}: a list needs an \"image\" name in every entry")
        data = {d["image"]: d for d in data}
    if not isinstance(data, dict):
        raise InputError(f"prompts file {path}: expected an object keyed by file name")
    return {str(name): _entry(str(name), entry, path) for name, entry in data.items()}


def _read_csv(path: Path) -> dict[str, ImagePrompts]:
    out: dict[str, ImagePrompts] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        needed = {"image", "x0", "y0", "x1", "y1"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise InputError(f"prompts file {path}: the header must name image,x0,y0,x1,y1 (and optionally slice)")
        for line, row in enumerate(reader, start=2):
            where = f"{path} line {line}"
            box = _numbers([[row["x0"], row["y0"], row["x1"], row["y1"]]], 4, where)[0]
            entry = out.setdefault(row["image"], ImagePrompts())
            entry.boxes.append(box)  # type: ignore[arg-type]
            if row.get("slice") not in (None, ""):
                try:
                    entry.slice = int(row["slice"])  # type: ignore[arg-type]
                except ValueError as exc:
                    raise InputError(f"{where}: slice must be a whole number") from exc
    return out


def _mask_path(folder: Path, stem: str) -> Optional[Path]:
    for suffix in MASK_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def has_mask(folder: Path, stem: str) -> bool:
    """Whether ``folder`` holds a mask for ``stem`` (casam-infer checks every input up front)."""
    return _mask_path(folder, stem) is not None


def find_mask(folder: Path, stem: str) -> Path:
    path = _mask_path(folder, stem)
    if path is None:
        raise InputError(f"no mask {stem}.* ({', '.join(MASK_SUFFIXES)}) in {folder} (--boxes-from-masks)")
    return path


def _jitter(box: np.ndarray, jitter: float, rng: np.random.Generator, width: int, height: int) -> tuple[float, ...]:
    """Each coordinate moved by uniform ±jitter, kept ordered and inside the image."""
    if jitter > 0:
        box = box + rng.uniform(-jitter, jitter, size=4)
    x0, x1 = sorted((float(np.clip(box[0], 0, width - 1)), float(np.clip(box[2], 0, width - 1))))
    y0, y1 = sorted((float(np.clip(box[1], 0, height - 1)), float(np.clip(box[3], 0, height - 1))))
    return x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0)


def boxes_from_masks(folder: Path, stem: str, is_volume: bool, axis: int, jitter: float,
                     rng: np.random.Generator) -> ImagePrompts:
    """One box per structure of ``stem``'s mask (a 3-D box per label value of a label volume)."""
    path = find_mask(folder, stem)
    if not is_volume:
        index = mask_to_index_map(read_pil(path, palette_indices=True))
        h, w = index.shape
        boxes = [_jitter(tight_box(index == k), jitter, rng, w, h) for k in range(1, int(index.max()) + 1)]
        if not boxes:
            raise InputError(f"mask {path} is empty: no structure to prompt for")
        return ImagePrompts(boxes=boxes, truth=index, truth_values=list(range(1, len(boxes) + 1)))  # type: ignore[arg-type]
    labels = np.rint(read_scan(path, strict_4d=True).data).astype(np.int64)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise InputError(f"label volume {path} is empty: no structure to prompt for")
    box3d = []
    for v in values:
        on = np.moveaxis(labels == v, axis, 0)
        zs = np.flatnonzero(on.any(axis=(1, 2)))
        plane = on.any(axis=0)
        h, w = plane.shape
        x0, y0, x1, y1 = _jitter(tight_box(plane), jitter, rng, w, h)
        box3d.append((x0, y0, float(zs[0]), x1, y1, float(zs[-1])))
    return ImagePrompts(box3d=box3d, truth=labels, truth_values=values)
