"""What an export is checked on, shared by the int8 quantiser and the parity check.

The verification images (the tasks' held-out images, site images, or seeded synthetic
ones), the tasks' recorded split images, the prompts drawn on each image and the IoU bars
live here, below both ``casam_export.quantize`` and ``casam_export.verify``, so neither
imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from casam_bundle import Bundle
from casam_core.errors import InputError
from casam_core.files import PathLike
from casam_export.errors import ExportError
from casam_io.image_io import PICTURE_SUFFIXES, files_by_stem, image_files
from runtime.deployment import MASK_IOU_BAR, UNKNOWN, mask_ious
from runtime.preprocess import Preprocessing

INT8_MASK_IOU_BAR = MASK_IOU_BAR  # the same bar the runtime re-checks on other CPUs
MASK_IOU_BARS = {"fp32": 0.999, "fp16": 0.99, "int8": INT8_MASK_IOU_BAR}
MAX_VERIFY_IMAGES = 8
__all__ = ["INT8_MASK_IOU_BAR", "MASK_IOU_BARS", "MAX_VERIFY_IMAGES", "UNKNOWN", "VerificationImages", "held_out_images",
           "image_paths", "mask_ious", "prompts_for", "split_images", "spread", "synthetic_images",
           "verification_images"]


def synthetic_images(seed: int = 0) -> list[np.ndarray]:
    """Three seeded images of different sizes, aspect ratios and depths (RGB, grey, 16-bit).

    Blobs on a textured background give the encoder structure to respond to; the odd sizes
    exercise the longest-side resize and padding. They are pictures, which every intensity
    handling min-max scales (``casam_io.intensity.effective_mode``), as preprocessing does
    with the 16-bit one, so they need no recorded window.
    """
    rng = np.random.default_rng(seed)
    images = []
    for h, w, kind in ((300, 420, "rgb"), (256, 256, "grey"), (410, 230, "uint16")):
        yy, xx = np.mgrid[0:h, 0:w]
        canvas = 40 + 20 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 6, (h, w))
        for _ in range(3):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.08, 0.2) * w
            canvas[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] += rng.uniform(90, 160)
        if kind == "rgb":
            tint = rng.uniform(0.6, 1.0, 3)
            images.append(np.clip(canvas[..., None] * tint, 0, 255).astype(np.uint8))
        elif kind == "grey":
            images.append(np.clip(canvas, 0, 255).astype(np.uint8))
        else:
            images.append(np.clip(canvas * 200, 0, 65535).astype(np.uint16))
    return images


def image_paths(folder: PathLike, option: str) -> list[Path]:
    """The image files of ``folder`` (or ``folder/images``) in name order: pictures, DICOM and
    NIfTI files, listed as ``casam-train eval --ood`` lists an image set; an empty or missing
    folder is one ExportError naming ``option``."""
    try:
        return list(image_files(folder).values())
    except InputError as exc:
        raise ExportError(f"{option}: {exc}") from exc


@dataclass(frozen=True)
class VerificationImages:
    """The images an export is checked on, prepared as the deployment prepares them, and
    where they came from (the folder, or "synthetic"). Read once per export: the int8
    bars, the chain's parity and the stored verification set use the same images.
    ``labels`` names each image's origin: the task whose held-out image it is, ``UNKNOWN``
    for a --verify-images site image, or "synthetic"."""

    images: tuple[np.ndarray, ...]
    source: str
    labels: tuple[str, ...] = ()

    def labels_or_default(self) -> tuple[str, ...]:
        return self.labels or (("synthetic" if self.source == "synthetic" else UNKNOWN),) * len(self.images)


def verification_images(folder: Optional[PathLike], prep: Preprocessing, bundle: Optional[Bundle] = None,
                        count: int = MAX_VERIFY_IMAGES) -> VerificationImages:
    """The tasks' held-out images (with ``bundle``: up to ``count``, spread over the tasks'
    split.json "test" lists), then the first MAX_VERIFY_IMAGES of ``folder`` (site images);
    ``synthetic_images`` when there are neither.

    ``prep`` is the bundle's recorded preprocessing and has no default: the deployment
    prepares every file with its intensity (``Preprocessing.read``: a volume is its middle slice, windowed
    over the whole volume), so parity measured on other grey levels would verify a chain
    the deployment never runs. An empty folder or an unreadable image is an ExportError.
    """
    held_out = held_out_images(bundle, prep, count) if bundle is not None else []
    site: list[np.ndarray] = []
    if folder is not None:
        files = image_paths(folder, "--verify-images")[:MAX_VERIFY_IMAGES]
        try:
            site = [prep.read(p)[0] for p in files]
        except InputError as exc:
            raise ExportError(f"--verify-images: {exc}") from exc
    if not held_out and not site:
        return VerificationImages(tuple(synthetic_images()), "synthetic")
    labels = tuple(label for label, _ in held_out) + (UNKNOWN,) * len(site)
    parts = ([f"held-out images of {', '.join(dict.fromkeys(label for label, _ in held_out))}"] if held_out else []) \
        + ([str(Path(folder))] if site else [])
    return VerificationImages(tuple(img for _, img in held_out) + tuple(site), " + ".join(parts), labels)


def held_out_images(bundle: Bundle, prep: Preprocessing, count: int) -> list[tuple[str, np.ndarray]]:
    """(task, image): up to ``count`` held-out images taken in turn from each task's split
    (the images the calibration never saw), or none where the recorded datasets are gone."""
    per_task = {name: split_images(bundle, name, count, prep, part="test") for name in bundle.task_names}
    chosen: list[tuple[str, np.ndarray]] = []
    for turn in range(count):
        for name, images in per_task.items():
            if turn < len(images) and len(chosen) < count:
                chosen.append((name, images[turn]))
    return chosen


def prompts_for(image: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Three boxes and two two-point prompts (one positive, one negative) in original pixels."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, 0.5, 3) * w, rng.uniform(0, 0.5, 3) * h
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.2, 0.5, 3) * w, y0 + rng.uniform(0.2, 0.5, 3) * h], axis=1)
    points = rng.uniform(0.1, 0.9, (2, 2, 2)) * np.array([w, h])
    return {"boxes": boxes.astype(np.float32), "points": points.astype(np.float32),
            "point_labels": np.array([[1, 0], [1, 1]], np.float32)}


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def split_images(bundle: Bundle, name: str, count: int, prep: Preprocessing, part: str = "train") -> list[np.ndarray]:
    """Up to ``count`` images of task ``name``'s ``part`` ("train", or "test": the held-out
    images the verification set is drawn from) as its split.json records them,
    prepared with ``prep``'s intensity as the trainer prepared them, or none when the recorded
    dataset is no longer where it was.

    Folder datasets only (images/<stem>.<ext> with the trainer's picture and DICOM suffixes);
    the stems are matched against the folder's listing, never joined into paths, since
    split.json is read from disk. Volume tasks' slices are not looked up: pass --calibration
    for them.
    """
    try:
        record = bundle.load_split(name)
    except (OSError, ValueError):
        return []
    data, train = record.get("data"), record.get(part)
    if not data or not isinstance(train, list) or record.get("kind", "folder") != "folder":
        return []
    folder = Path(str(data)) / "images"
    if not folder.is_dir():
        return []
    by_stem = files_by_stem(folder, PICTURE_SUFFIXES)  # the trainer's listing, and its pick on a shared stem
    chosen = [by_stem[stem] for stem in train if isinstance(stem, str) and stem in by_stem]
    return [prep.read(p)[0] for p in spread(chosen, count)]
