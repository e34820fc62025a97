"""Pictures through Pillow: PNG, JPEG, TIFF, BMP (8- and 16-bit, palette, RGBA).

The pixel limit is checked on the header before any decoding, so a decompression bomb costs
nothing and a huge scan fails with one line instead of swapping.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from casam_core.errors import InputError
from casam_io.intensity import Source
from casam_io.readers.base import DEFAULT_MAX_PIXELS, ReadOptions, Reader
from casam_io.scan import PathLike, Scan, check_pixels, standard_channels

_PIL_LIMIT_LOCK = threading.Lock()


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


def _open_header(path: Path) -> Image.Image:
    """Open lazily (header only). casam checks its own limit on the header, so Pillow's global
    one is lifted for this call only: its DecompressionBombError would otherwise fire first,
    at 2×89.5 Mpx, before we know the size."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def read_pil(path: PathLike, palette_indices: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Pillow-readable file → array, decoded once. ``palette_indices`` keeps a palette
    image's indices (label maps are often saved as palette PNGs) instead of converting to RGB."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist")
    try:
        with _open_header(p) as img:
            check_pixels(img.size[0], img.size[1], max_pixels, p)
            img.load()
            if palette_indices and img.mode == "P":
                return np.asarray(img)
            return _pil_to_array(img)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # defensive: a plugin that re-checks on load
        raise InputError(f"image {p} exceeds Pillow's decompression-bomb limit ({exc}); see --max-pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {p} is unreadable or corrupt ({exc})") from exc


class PictureReader(Reader):
    name = "picture"
    kind = "picture"
    suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

    def read(self, path: Path, options: ReadOptions) -> Scan:
        return Scan(path, standard_channels(read_pil(path, max_pixels=options.max_pixels)), Source(kind="image", pil=True))
