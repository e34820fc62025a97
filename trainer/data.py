"""Training data: folders of images + masks, or NIfTI volumes, validated before training.

Every file is read once up front. Bad data (missing or unreadable files, size mismatches)
is reported in one error that lists all offending files, because a hospital preparing a
dataset wants the whole list, not one failure per run. Empty masks are skipped and counted.
Each sample remembers its image's content hash, which keys the embedding cache.

A structure is one foreground object to prompt for: a binary mask has one, a label map
has one per non-zero value (METHOD.md). Structures are kept as an "index map" (0 =
background, 1..k = structure), which resizes into the model frame in one nearest pass.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from runtime.errors import CasamError, InputError
from runtime.files import read_json
from runtime.image_io import IMAGE_SUFFIXES, read_image, read_nifti_volume, read_pil

PathLike = Union[str, os.PathLike]
MAX_LABELS = 32  # more distinct values than this: a soft/JPEG-compressed binary mask
TEST_FRACTION = 0.2
NIFTI_WINDOW = (0.5, 99.5)
MAX_LISTED = 20


class DataError(CasamError):
    """A dataset that cannot be trained on; the message lists every offending file."""


def content_hash(array: np.ndarray) -> str:
    """sha256 of a decoded array (shape, dtype, bytes): identical pixels give identical keys."""
    a = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


def mask_to_index_map(mask: np.ndarray) -> np.ndarray:
    """Any mask → H×W uint8 structure map (0 background, 1..k one value per structure).

    - one non-zero value (0/1, 0/255, …): one structure;
    - 2..MAX_LABELS distinct non-zero values: a label map, one structure per value;
    - more: a soft or JPEG-compressed binary mask, thresholded at half its maximum;
    - colour masks: one structure per distinct non-black colour (greyscale if R=G=B).
    """
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[:, :, :3] if m.shape[2] >= 3 else m[:, :, 0]
        if m.ndim == 3:
            if np.array_equal(m[:, :, 0], m[:, :, 1]) and np.array_equal(m[:, :, 0], m[:, :, 2]):
                m = m[:, :, 0]
            else:
                packed = (m[:, :, 0].astype(np.int64) << 16) | (m[:, :, 1].astype(np.int64) << 8) | m[:, :, 2]
                m = packed
    if m.ndim != 2:
        raise InputError(f"a mask must be H×W or H×W×C, got shape {m.shape}")
    values = np.unique(m)
    values = values[values != 0]
    if len(values) <= 1:
        return (m != 0).astype(np.uint8)
    if len(values) > MAX_LABELS:
        return (m.astype(np.float64) > float(m.max()) / 2.0).astype(np.uint8)
    out = np.zeros(m.shape, np.uint8)
    for i, v in enumerate(values, start=1):
        out[m == v] = i
    return out


@dataclass
class Sample:
    """One 2-D training image and its structures; arrays are kept only for NIfTI slices."""

    stem: str
    source: str
    original_hw: tuple[int, int]
    image_hash: str
    num_structures: int
    image_path: Optional[Path] = None
    mask_path: Optional[Path] = None
    image_array: Optional[np.ndarray] = field(default=None, repr=False)
    index_array: Optional[np.ndarray] = field(default=None, repr=False)

    def image(self) -> np.ndarray:
        return self.image_array if self.image_array is not None else read_image(self.image_path)  # type: ignore[arg-type]

    def index_map(self) -> np.ndarray:
        if self.index_array is not None:
            return self.index_array
        return mask_to_index_map(read_pil(self.mask_path, palette_indices=True))  # type: ignore[arg-type]

    def structures(self) -> np.ndarray:
        """K×H×W bool, one mask per structure, at the original size."""
        idx = self.index_map()
        return idx[None] == np.arange(1, int(idx.max()) + 1, dtype=idx.dtype)[:, None, None]


@dataclass
class Dataset:
    root: Path
    kind: str  # "folder" or "nifti"
    train: list[Sample]
    test: list[Sample]
    split_source: str
    seed: int
    skipped_empty: list[str]
    axis: int = 2

    @property
    def samples(self) -> list[Sample]:
        return self.train + self.test

    def split_record(self) -> dict[str, Any]:
        """What tasks/<name>/split.json records: enough to re-create the exact split."""
        return {
            "source": self.split_source,
            "seed": self.seed,
            "data": str(self.root),
            "kind": self.kind,
            "axis": self.axis,
            "train": [s.stem for s in self.train],
            "test": [s.stem for s in self.test],
            "skipped_empty": list(self.skipped_empty),
        }


def _raise_problems(root: Path, problems: list[str]) -> None:
    """One DataError listing every offending file (the first MAX_LISTED of them), if any."""
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DataError(f"{len(problems)} problem(s) in {root}:\n  {shown}{more}")


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if p.is_file() and not p.name.startswith(".") and name.endswith(suffixes):
            stem = p.name[: -len(".nii.gz")] if name.endswith(".nii.gz") else p.stem
            out.setdefault(stem, p)
    return out


def _scan_folder(root: Path) -> tuple[list[Sample], list[str]]:
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DataError(
            f"{root} is not a dataset: expected images/ and masks/ (matching stems), "
            "or images/*.nii.gz with labels/*.nii.gz"
        )
    images = _files_by_stem(images_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(masks_dir, IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    problems: list[str] = []
    samples: list[Sample] = []
    empty: list[str] = []
    for stem, ipath in images.items():
        mpath = masks.get(stem)
        if mpath is None:
            problems.append(f"{ipath.name}: no mask {stem}.* in {masks_dir}")
            continue
        try:
            image = read_image(ipath)
        except InputError as exc:
            problems.append(f"{ipath}: unreadable image ({exc})")
            continue
        try:
            index = mask_to_index_map(read_pil(mpath, palette_indices=True))
        except InputError as exc:
            problems.append(f"{mpath}: unreadable mask ({exc})")
            continue
        if index.shape != image.shape[:2]:
            problems.append(f"{mpath.name}: mask is {index.shape[0]}×{index.shape[1]} but image {ipath.name} is {image.shape[0]}×{image.shape[1]}")
            continue
        k = int(index.max())
        if k == 0:
            empty.append(stem)
            continue
        samples.append(Sample(stem, str(ipath), image.shape[:2], content_hash(image), k, image_path=ipath, mask_path=mpath))
    _raise_problems(root, problems)
    return samples, empty


def _window(volume: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    lo, hi = np.percentile(volume, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip(np.rint((volume.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _load_volume(path: Path) -> np.ndarray:
    volume = np.squeeze(read_nifti_volume(path))
    if volume.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {volume.shape}")
    return volume


def _scan_nifti(root: Path, axis: int, window: tuple[float, float]) -> tuple[list[Sample], list[str]]:
    images = _files_by_stem(root / "images", (".nii", ".nii.gz"))
    labels = _files_by_stem(root / "labels", (".nii", ".nii.gz"))
    problems: list[str] = []
    samples: list[Sample] = []
    empty: list[str] = []
    for stem, ipath in images.items():
        lpath = labels.get(stem)
        if lpath is None:
            problems.append(f"{ipath.name}: no label volume {stem}.nii(.gz) in {root / 'labels'}")
            continue
        try:
            vol, lab = _load_volume(ipath), _load_volume(lpath)
        except InputError as exc:
            problems.append(f"{ipath.name} / {lpath.name}: {exc}")
            continue
        if vol.shape != lab.shape:
            problems.append(f"{lpath.name}: label volume is {lab.shape} but image volume {ipath.name} is {vol.shape}")
            continue
        windowed = _window(vol, window)
        for k in range(vol.shape[axis]):
            index = mask_to_index_map(np.rint(np.take(lab, k, axis=axis)).astype(np.int64))
            slice_stem = f"{stem}_a{axis}_{k:04d}"
            if index.max() == 0:
                empty.append(slice_stem)
                continue
            image = np.ascontiguousarray(np.take(windowed, k, axis=axis))
            samples.append(Sample(slice_stem, f"{ipath}[axis {axis}, slice {k}]", image.shape[:2], content_hash(image),
                                  int(index.max()), image_array=image, index_array=index))
    _raise_problems(root, problems)
    return samples, empty


def is_nifti_dataset(root: Path) -> bool:
    folder = root / "images"
    return folder.is_dir() and (root / "labels").is_dir() and any(
        p.name.lower().endswith((".nii", ".nii.gz")) for p in folder.iterdir()
    )


def _split(samples: list[Sample], root: Path, seed: int, test_fraction: float,
           fixed: Optional[dict[str, Any]]) -> tuple[list[Sample], list[Sample], str]:
    by_stem = {s.stem: s for s in samples}
    split_file = root / "split.json"
    if fixed is None and split_file.is_file():
        try:
            fixed = read_json(split_file)
        except ValueError as exc:
            raise DataError(f"{split_file} is not valid JSON ({exc})") from exc
        source = "split.json"
    else:
        source = "recorded" if fixed is not None else f"seeded {round((1 - test_fraction) * 100)}/{round(test_fraction * 100)}"
    if fixed is not None:
        if not isinstance(fixed, dict) or not isinstance(fixed.get("train"), list) or not isinstance(fixed.get("test"), list):
            raise DataError(f"a split needs lists 'train' and 'test' of stems ({split_file})")
        unknown = [s for s in fixed["train"] + fixed["test"] if s not in by_stem]
        known = set(by_stem)
        return ([by_stem[s] for s in fixed["train"] if s in known],
                [by_stem[s] for s in fixed["test"] if s in known],
                source + (f" ({len(unknown)} listed stems missing or empty)" if unknown else ""))
    order = np.random.default_rng(seed).permutation(len(samples))
    n_test = int(round(len(samples) * test_fraction))
    if len(samples) >= 2 and test_fraction > 0:
        n_test = min(max(n_test, 1), len(samples) - 1)
    test_idx = set(order[:n_test].tolist())
    train = [s for i, s in enumerate(samples) if i not in test_idx]
    test = [s for i, s in enumerate(samples) if i in test_idx]
    return train, test, source


def load_dataset(
    path: PathLike,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    split: Optional[dict[str, Any]] = None,
    axis: int = 2,
    window: tuple[float, float] = NIFTI_WINDOW,
) -> Dataset:
    """Scan, validate and split a dataset folder (folder format or NIfTI volumes).

    ``split`` (train/test stem lists, e.g. from a bundle's split.json) overrides both the
    folder's split.json and the seeded split.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    if is_nifti_dataset(root):
        samples, empty = _scan_nifti(root, axis, window)
        kind = "nifti"
    else:
        samples, empty = _scan_folder(root)
        kind = "folder"
    if not samples:
        raise DataError(f"{root}: no image has a non-empty mask ({len(empty)} empty masks skipped)")
    train, test, source = _split(samples, root, seed, test_fraction, split)
    if not train:
        raise DataError(f"{root}: the training split is empty")
    return Dataset(root, kind, train, test, source, seed, empty, axis)


def load_images(path: PathLike) -> list[Sample]:
    """Images without masks (e.g. an OOD set): ``path/images/*`` or the images in ``path``."""
    root = Path(path)
    folder = root / "images" if (root / "images").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = _files_by_stem(folder, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    problems: list[str] = []
    out: list[Sample] = []
    for stem, p in files.items():
        try:
            image = read_image(p)
        except InputError as exc:
            problems.append(f"{p}: unreadable image ({exc})")
            continue
        out.append(Sample(stem, str(p), image.shape[:2], content_hash(image), 0, image_path=p))
    _raise_problems(root, problems)
    return out
