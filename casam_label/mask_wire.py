"""How a mask travels in a JSON reply: its bounding region, run-length encoded.

One home for the format, imported by the server (``casam_label.native``), by Python
clients and by the tests; the browser viewer's JavaScript decodes the same thing
(docs/INTERACTIVE.md, "Masks in replies"). A mask on a 512×512 slice is 256 kB as bytes;
an organ's bounding region as runs is a few hundred numbers, so a click's reply stays small.

The encoding of an H×W bool mask:

- ``shape``: [H, W] of the whole slice;
- ``bbox``: [x0, y0, x1, y1] of the set pixels, x0/y0 inclusive, x1/y1 exclusive, or null
  for an empty mask;
- ``rle``: run lengths over the region ``mask[y0:y1, x0:x1]`` in row-major order,
  alternating zeros and ones and starting with a run of zeros (which may be 0); [] when
  empty. Or, with ``mask_format="png"``, ``png``: the region as a base64 0/255 PNG.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

from casam_core.errors import InputError
from casam_io.writers.png import png_bytes

FORMATS = ("rle", "png")


def bbox(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of the set pixels, ends exclusive; None when none is set."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def runs(flat: np.ndarray) -> list[int]:
    """Run lengths of a 1-D bool array, the first run counting zeros (possibly 0)."""
    flat = np.asarray(flat, dtype=bool)
    if flat.size == 0:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    lengths = np.diff(np.concatenate(([0], edges, [flat.size])))
    out = [int(n) for n in lengths]
    return [0] + out if flat[0] else out


def unruns(lengths: list[int], size: int) -> np.ndarray:
    """The 1-D bool array of ``size`` elements that ``runs`` encoded."""
    counts = np.asarray(lengths, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != size:
        raise InputError(f"run lengths must be non-negative and add up to {size}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts)


def encode(mask: np.ndarray, fmt: str = "rle") -> dict[str, Any]:
    """An H×W bool mask → ``{"shape", "bbox", "rle"}`` (or ``"png"`` instead of ``"rle"``)."""
    if fmt not in FORMATS:
        raise InputError(f"mask_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    mask = np.asarray(mask, dtype=bool)
    box = bbox(mask)
    out: dict[str, Any] = {"shape": [int(mask.shape[0]), int(mask.shape[1])], "bbox": None if box is None else list(box)}
    region = mask[box[1]:box[3], box[0]:box[2]] if box is not None else mask[:0, :0]
    if fmt == "png":
        out["png"] = None if box is None else base64.b64encode(png_bytes(np.where(region, 255, 0).astype(np.uint8))).decode()
    else:
        out["rle"] = runs(region.reshape(-1))
    return out


def decode(wire: Mapping[str, Any]) -> np.ndarray:
    """``encode``'s dict → the H×W bool mask (for clients and tests)."""
    h, w = (int(v) for v in wire["shape"])
    mask = np.zeros((h, w), dtype=bool)
    if wire.get("bbox") is None:
        return mask
    x0, y0, x1, y1 = (int(v) for v in wire["bbox"])
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InputError(f"bbox {wire['bbox']} does not fit a {h}×{w} mask")
    if "png" in wire:
        region = np.asarray(Image.open(io.BytesIO(base64.b64decode(wire["png"])))) > 0
    else:
        region = unruns(list(wire["rle"]), (y1 - y0) * (x1 - x0)).reshape(y1 - y0, x1 - x0)
    if region.shape != (y1 - y0, x1 - x0):
        raise InputError(f"the mask region is {region.shape}, its bbox says {(y1 - y0, x1 - x0)}")
    mask[y0:y1, x0:x1] = region
    return mask
