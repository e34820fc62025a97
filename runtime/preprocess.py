"""Numpy preprocessing for SAM: the single implementation used by trainer and runtime.

The trainer imports this module for its embedding cache, and the edge runtime runs it
before the encoder, so training and inference can never see differently prepared images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, Union
import os

import numpy as np
from PIL import Image

from casam_core.errors import InputError
from casam_io.image_io import DEFAULT_MAX_PIXELS, prepared_slice, read_scan, slice_at
from casam_io.intensity import Intensity, Source, apply_window, find_window, nonfinite_warning, to_uint8
from casam_io.scan import Scan, standard_channels

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_SIZE = 1024
ResizeMode = Literal["longest", "stretch"]
RESIZE_MODES = ("longest", "stretch")


@dataclass(frozen=True)
class Preprocessing:
    """How images are brought to SAM's input frame; recorded in bundle and manifest.

    ``longest`` is SAM's convention (resize the longest side, zero-pad bottom/right);
    ``stretch`` is the CA-SAM authors' (resize straight to size×size). ``intensity`` is how
    raw values became 8-bit (casam_io.intensity); bundles and manifests written before it
    was recorded read as ``auto``, which is how they were trained.
    """

    resize: ResizeMode = "longest"
    size: int = IMAGE_SIZE
    mean: tuple[float, float, float] = field(default=PIXEL_MEAN)
    std: tuple[float, float, float] = field(default=PIXEL_STD)
    intensity: Intensity = field(default_factory=Intensity)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise InputError(f"unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "intensity"}
        out["intensity"] = self.intensity.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        return cls(
            resize=data["resize"],
            size=int(data["size"]),
            mean=tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]
            intensity=Intensity.from_dict(data.get("intensity")),
        )

    # ----- raw values → the 8-bit image the encoder is fed, with the recorded intensity ---------
    def prepare(self, image: Union[Scan, np.ndarray], index: Optional[int] = None,
                axis: int = 2) -> tuple[np.ndarray, list[str]]:
        """A scan (slice ``index`` along ``axis`` of a volume, the middle one by default,
        windowed over the whole volume) or a raw array → (8-bit image, warnings).

        A raw array is a 2-D image: 8-bit data is kept, deeper data (a CT slice in
        Hounsfield units, say) gets this preprocessing's intensity handling, so a recorded
        CT window is applied, never a silent min-max.
        """
        if isinstance(image, Scan):
            return prepared_slice(image, self.intensity, index, axis)
        array = standard_channels(image)
        if array.dtype == np.uint8:
            return array, []
        return to_uint8(array, self.intensity, Source(kind="image"))

    def read(self, path: Union[str, "os.PathLike[str]"], index: Optional[int] = None, axis: int = 2,
             volume: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
        """Any file casam reads → ``prepare`` of it: the 8-bit image the engines were trained on."""
        return self.prepare(read_scan(path, volume=volume, max_pixels=max_pixels), index, axis)

    def slices(self, scan: Scan, axis: int = 2) -> "VolumeSlices":
        """A volume's slices one at a time, with one window found for the whole volume."""
        return VolumeSlices(scan, axis, self.intensity)


class VolumeSlices:
    """Slice k of a volume as 8-bit, windowed as the whole volume would be (bit-identical to
    ``Preprocessing.prepare(scan, k, axis)``), with the window found once, not per slice."""

    def __init__(self, scan: Scan, axis: int, intensity: Intensity) -> None:
        self.scan, self.axis = scan, axis
        self.window, bad = find_window(scan.data, intensity, scan.source)
        self.warnings = list(scan.warnings) + ([nonfinite_warning(bad)] if bad else [])

    def __call__(self, k: int) -> np.ndarray:
        raw = slice_at(self.scan.data, k, self.axis)
        return np.ascontiguousarray(apply_window(raw, self.window, self.scan.source.invert))


@dataclass(frozen=True)
class Frame:
    """Where an original H×W image lands inside the size×size model input."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    size: int

    @property
    def scale_xy(self) -> tuple[float, float]:
        (h, w), (rh, rw) = self.original_hw, self.resized_hw
        return rw / w, rh / h


def frame_for(height: int, width: int, prep: Preprocessing) -> Frame:
    if height <= 0 or width <= 0:
        raise InputError(f"image has an empty size {height}×{width}")
    if prep.resize == "stretch":
        return Frame((height, width), (prep.size, prep.size), prep.size)
    scale = prep.size / max(height, width)
    # Same rounding as segment-anything's ResizeLongestSide.get_preprocess_shape.
    return Frame((height, width), (int(height * scale + 0.5), int(width * scale + 0.5)), prep.size)


def to_rgb_255(image: np.ndarray, intensity: Optional[Intensity] = None) -> np.ndarray:
    """Any H×W or H×W×C array → H×W×3 uint8 on a 0–255 scale.

    8-bit data is kept as is. Deeper data (16-bit, int, float) gets ``intensity``
    (casam_io.intensity, the one implementation; the manifest's, through ``preprocess``):
    a recorded CT window is applied, ``auto`` min-max scales a 2-D image; NaN pixels become
    black. Without ``intensity`` only 8-bit data is taken: scaling anything else would be a
    guess. Alpha is dropped; grey is replicated.
    """
    array = standard_channels(image)
    if array.dtype != np.uint8:
        if intensity is None:
            raise InputError(f"a {array.dtype} image needs an intensity handling to become 8-bit "
                             "(Preprocessing.prepare applies the recorded one)")
        array, _ = to_uint8(array, intensity, Source(kind="image"))
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def resize_rgb(rgb: np.ndarray, resized_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H×W×3 uint8 image with Pillow (as segment-anything does)."""
    h, w = resized_hw
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


@lru_cache(maxsize=8)
def normalisation_tables(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """3×256 float32: ``(v - mean[c]) / std[c]`` for every 8-bit value ``v``.

    The resized image is 8-bit, so normalising is a table lookup per pixel. The table is
    computed with the same float32 arithmetic as normalising each pixel, so the result is
    bit-identical, at a quarter of the time of float conversion, subtraction and division
    over the whole image.
    """
    values = np.arange(256, dtype=np.float32)[None, :]
    tables = (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    tables.setflags(write=False)  # shared by every caller through the cache
    return tables


def preprocess(image: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, Frame]:
    """Image → (1×3×size×size float32 normalised input, its Frame). A deeper than 8-bit
    image gets ``prep``'s intensity handling (``Preprocessing.prepare``)."""
    rgb = to_rgb_255(image, prep.intensity)
    frame = frame_for(rgb.shape[0], rgb.shape[1], prep)
    resized = resize_rgb(rgb, frame.resized_hw)
    tables = normalisation_tables(prep.mean, prep.std)
    rh, rw = frame.resized_hw
    out = np.empty((1, 3, prep.size, prep.size), dtype=np.float32)
    out[0, :, rh:, :] = 0.0  # zero padding bottom and right, as SAM pads
    out[0, :, :rh, rw:] = 0.0
    for channel in range(3):
        np.take(tables[channel], resized[:, :, channel], out=out[0, channel, :rh, :rw])
    return out, frame


def resize_mask_to_frame(mask: np.ndarray, frame: Frame) -> np.ndarray:
    """Nearest-neighbour resize of an H×W label/binary mask into the size×size frame."""
    rh, rw = frame.resized_hw
    resized = np.asarray(Image.fromarray(np.asarray(mask)).resize((rw, rh), Image.NEAREST))
    out = np.zeros((frame.size, frame.size), dtype=resized.dtype)
    out[:rh, :rw] = resized
    return out


def boxes_to_frame(boxes: np.ndarray, frame: Frame) -> np.ndarray:
    """K×4 xyxy boxes in original pixels → the model's size×size frame."""
    sx, sy = frame.scale_xy
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], dtype=np.float32)


def points_to_frame(points: np.ndarray, frame: Frame) -> np.ndarray:
    """…×2 xy points in original pixels → the model's size×size frame."""
    sx, sy = frame.scale_xy
    return np.asarray(points, dtype=np.float32) * np.array([sx, sy], dtype=np.float32)
