"""What casam-infer leaves on disk: mask PNGs, an overlay PNG and a JSON record per image.

Masks are single-channel 0/255 PNGs at the original image size, so any viewer or script
reads them without casam. Every file is written atomically; the JSON record is written
last and lists the mask files, so a record on disk always describes complete masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from casam_core.files import atomic_write_bytes, atomic_write_json
from casam_io.writers.png import png_bytes, write_mask
from runtime.preprocess import to_rgb_255

# Distinct, colour-blind-friendly hues (Okabe–Ito) for up to eight prompts, then repeated.
PALETTE = np.array(
    [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
     (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255)], dtype=np.float32,
)
ALPHA = 0.45


def overlay(image: np.ndarray, masks: np.ndarray, boxes: Optional[np.ndarray] = None,
            points: Optional[np.ndarray] = None) -> np.ndarray:
    """The image in RGB with each mask tinted in its own colour, and the prompts drawn."""
    rgb = to_rgb_255(image).astype(np.float32)
    for k, mask in enumerate(masks):
        colour = PALETTE[k % len(PALETTE)]
        rgb[mask] = (1.0 - ALPHA) * rgb[mask] + ALPHA * colour
    canvas = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    for k, box in enumerate([] if boxes is None else np.asarray(boxes).reshape(-1, 4)):
        draw.rectangle([float(v) for v in box], outline=tuple(int(c) for c in PALETTE[k % len(PALETTE)]), width=width)
    radius = 2 * width + 1
    for x, y in [] if points is None else np.asarray(points).reshape(-1, 2):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 0, 0), width=width)
    return np.asarray(canvas)


PromptArrays = tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]  # boxes, points, labels


def write_outputs(folder: Path, stem: str, image_path: str, image: np.ndarray, result: Any, prompts: PromptArrays,
                  with_overlay: bool, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write one image's masks (and overlay), then its JSON record, into ``folder`` (the
    staging folder of casam_core.ownership.OutputDir.group: the files appear in --out
    together); returns the record. ``fields`` end the record: the backend, the evaluation."""
    boxes, points, labels = prompts
    mask_files = []
    for k, mask in enumerate(result.masks):
        name = f"{stem}_mask{k}.png"
        write_mask(folder / name, mask)
        mask_files.append(name)
    overlay_file = None
    if with_overlay:
        overlay_file = f"{stem}_overlay.png"
        atomic_write_bytes(folder / overlay_file, png_bytes(overlay(image, result.masks, boxes, points)))
    record = {
        "image": image_path,
        "size": [int(result.masks.shape[1]), int(result.masks.shape[2])] if len(result.masks) else None,
        "route": result.route,
        "scores": result.scores,
        "thresholds": result.thresholds,
        "prompts": _prompts(result, boxes, points, labels, mask_files),
        "overlay": overlay_file,
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        "warnings": list(getattr(result, "warnings", [])),
        **dict(fields),
    }
    atomic_write_json(folder / f"{stem}.json", record)
    return record


def _prompts(result: Any, boxes: Optional[np.ndarray], points: Optional[np.ndarray],
             labels: Optional[np.ndarray], mask_files: Sequence[str]) -> list[dict[str, Any]]:
    prompts = []
    for k, name in enumerate(mask_files):
        entry: dict[str, Any] = {"mask": name, "iou": float(result.iou[k]), "area": int(result.masks[k].sum())}
        if boxes is not None:
            entry["box"] = [float(v) for v in np.asarray(boxes).reshape(-1, 4)[k]]
        if points is not None:
            entry["points"] = np.asarray(points)[k].tolist()
            entry["labels"] = np.asarray(labels)[k].astype(int).tolist()
        prompts.append(entry)
    return prompts
