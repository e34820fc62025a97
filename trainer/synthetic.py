"""Synthetic segmentation tasks: generated shapes on per-style textures.

Tests and the demo need tasks that train in seconds on the tiny SAM and that the router
can tell apart, without shipping any medical data. Each style is a "domain": its own
background colour and texture and its own shape colour, so pooled encoder features of
two styles differ clearly, while the segmentation problem (find the shapes) is the same.
Masks come in the formats real datasets use: binary 0/255, binary 0/1 and label maps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from casam_core.files import PathLike
from casam_core.errors import InputError
from casam_core.files import atomic_path

Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _stripes(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(12, 14)
    phase = rng.uniform(0, 2 * np.pi)
    return (np.sin((xx + yy) * 2 * np.pi / period + phase) > 0).astype(np.float32)


def _dots(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(13.5, 14.5)
    ox, oy = rng.uniform(0, period, size=2)
    dx = (xx + ox) % period - period / 2
    dy = (yy + oy) % period - period / 2
    return (dx * dx + dy * dy < (period / 4) ** 2).astype(np.float32)


def _plasma(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = rng.uniform(0.02, 0.05, size=3)
    p = rng.uniform(0, 2 * np.pi, size=3)
    v = np.sin(xx * f[0] + p[0]) + np.sin(yy * f[1] + p[1]) + np.sin((xx + yy) * f[2] + p[2])
    return ((v + 3.0) / 6.0).astype(np.float32)


def _checker(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cell = int(rng.integers(16, 19))
    return (((yy // cell) + (xx // cell)) % 2).astype(np.float32)


@dataclass(frozen=True)
class Style:
    """A synthetic domain: background colours blended by a texture, and a shape colour."""

    background: tuple[int, int, int]
    texture_colour: tuple[int, int, int]
    shape_colour: tuple[int, int, int]
    texture: Texture


STYLES: dict[str, Style] = {
    # Task domains.
    "stripes": Style((25, 45, 125), (90, 130, 220), (240, 205, 60), _stripes),
    "dots": Style((35, 105, 55), (215, 235, 210), (190, 50, 175), _dots),
    "checker": Style((70, 70, 70), (150, 150, 150), (225, 40, 40), _checker),
    # Out-of-distribution domain: nothing like the others.
    "plasma": Style((150, 20, 10), (255, 190, 40), (20, 220, 230), _plasma),
}


def _shape_layer(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One random filled ellipse or convex polygon as an H×W bool mask."""
    h, w = size
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    rx, ry = rng.uniform(0.07, 0.16) * w, rng.uniform(0.07, 0.16) * h
    if rng.random() < 0.5:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radius = rng.uniform(0.7, 1.0, size=n)
        pts = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radius)]
        draw.polygon(pts, fill=1)
    return np.asarray(layer, dtype=bool)


def render_sample(style: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×3 uint8 image, H×W uint8 structure map with values 0..k) for one sample."""
    if style not in STYLES:
        raise InputError(f"unknown synthetic style {style!r}; styles: {', '.join(STYLES)}")
    spec = STYLES[style]
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = spec.texture(yy, xx, rng)[..., None]
    image = (1 - t) * np.asarray(spec.background, np.float32) + t * np.asarray(spec.texture_colour, np.float32)
    labels = np.zeros((h, w), np.uint8)
    wanted, attempts = int(rng.integers(1, 4)), 0
    while labels.max() < wanted and attempts < 20:
        attempts += 1
        shape = _shape_layer(size, rng)
        if shape.sum() < 0.005 * h * w:
            continue  # too small to prompt for; draw another
        labels[shape] = labels.max() + 1
        tint = np.asarray(spec.shape_colour, np.float32) * rng.uniform(0.85, 1.0)
        image[shape] = tint
    # Keep only labels that survived overlaps, renumbered 1..k.
    kept = [v for v in np.unique(labels) if v and (labels == v).sum() > 0]
    remap = np.zeros(256, np.uint8)
    for i, v in enumerate(kept, start=1):
        remap[v] = i
    labels = remap[labels]
    image += rng.normal(0, 8, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _style_seed(style: str) -> int:
    return int.from_bytes(hashlib.sha256(style.encode()).digest()[:4], "little")


def write_synthetic_task(root: PathLike, style: str, count: int, seed: int = 0, size: tuple[int, int] = (256, 256)) -> Path:
    """Write ``count`` samples of ``style`` as ``root/images/*.png`` + ``root/masks/*.png``.

    Masks use every format the data loader accepts: several shapes → a label map (1..k);
    one shape → binary 0/255 on even indices and 0/1 on odd ones. The same (style, seed,
    index) always gives the same sample, so different seeds give disjoint held-out sets.
    """
    if count < 1:
        raise InputError(f"count must be at least 1, got {count}")
    root = Path(root)
    h, w = int(size[0]), int(size[1])
    for i in range(count):
        rng = np.random.default_rng([_style_seed(style), seed, i])
        image, labels = render_sample(style, (h, w), rng)
        k = int(labels.max())
        if k > 1:
            mask = labels
        else:
            mask = (labels > 0).astype(np.uint8) * (255 if i % 2 == 0 else 1)
        stem = f"{style}_{seed}_{i:04d}"
        _save_png(image, root / "images" / f"{stem}.png")
        _save_png(mask, root / "masks" / f"{stem}.png")
    return root
