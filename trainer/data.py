"""Training data: folders of images + masks, or volumes + label volumes, validated before training.

Volumes are NIfTI files or DICOM series folders (``images/<case>.nii.gz`` or
``images/<case>/``) with NIfTI labels (``labels/<case>.nii.gz``), sliced along any axis.
Every image goes through casam_io.image_io and casam_io.intensity, the reader and intensity
handling the runtime applies at the edge, so trained and deployed slices are bit-identical.
A volume's slices are split together (by case), so no test slice has a training neighbour.

Every file is read once up front. Bad data (missing or unreadable files, size mismatches)
is reported in one error that lists all offending files, because a hospital preparing a
dataset wants the whole list, not one failure per run. Empty masks are skipped and counted.
Each sample remembers its image's content hash, which keys the embedding cache.

Structures (the objects to prompt for) are defined in casam_core.structures, shared with
casam-infer's ``--boxes-from-masks``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from casam_core.errors import CasamError, InputError
from casam_core.files import PathLike, read_json
from casam_io.image_io import (IMAGE_SUFFIXES, NIFTI_SUFFIXES, PICTURE_SUFFIXES, Scan, files_by_stem,
                              prepare, read_pil, read_prepared, read_scan, slice_at)
from casam_io.image_io import image_files as runtime_image_files
from casam_io.intensity import Intensity
from casam_core.structures import mask_to_index_map, structure_masks

TEST_FRACTION = 0.2
MAX_LISTED = 20
# A label volume's affine may differ from its image's by this much (mm, and direction
# cosines × spacing): far below any voxel, above the rounding of positions in DICOM
# (decimal strings) and NIfTI (float32, ~1e-4 mm at 1000 mm from the origin).
GEOMETRY_TOL_MM = 0.01


class DataError(CasamError):
    """A dataset that cannot be trained on; the message lists every offending file."""


def content_hash(array: np.ndarray) -> str:
    """sha256 of a decoded array (shape, dtype, bytes): identical pixels give identical keys."""
    a = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


@dataclass
class Sample:
    """One 2-D training image and its structures; arrays are kept only for volume slices.

    ``case`` is the volume a slice comes from (the image's own stem for 2-D files): the
    unit of the train/test split.
    """

    stem: str
    source: str
    original_hw: tuple[int, int]
    image_hash: str
    num_structures: int
    image_path: Optional[Path] = None
    mask_path: Optional[Path] = None
    image_array: Optional[np.ndarray] = field(default=None, repr=False)
    index_array: Optional[np.ndarray] = field(default=None, repr=False)
    case: str = ""
    intensity: Intensity = field(default_factory=Intensity, repr=False)

    def __post_init__(self) -> None:
        self.case = self.case or self.stem

    def image(self) -> np.ndarray:
        """The 8-bit image the encoder is given, exactly as the runtime prepares it."""
        if self.image_array is not None:
            return self.image_array
        return read_prepared(self.image_path, self.intensity)[0]  # type: ignore[arg-type]

    def index_map(self) -> np.ndarray:
        if self.index_array is not None:
            return self.index_array
        return mask_to_index_map(read_pil(self.mask_path, palette_indices=True))  # type: ignore[arg-type]

    def structures(self) -> np.ndarray:
        """K×H×W bool, one mask per structure, at the original size."""
        return structure_masks(self.index_map())


@dataclass
class Dataset:
    root: Path
    kind: str  # "folder", "nifti", "dicom" or "volumes" (both)
    train: list[Sample]
    test: list[Sample]
    split_source: str
    seed: int
    skipped_empty: list[str]
    axis: int = 2
    intensity: Intensity = field(default_factory=Intensity)
    volume: Optional[int] = None  # the volume of 4-D images trained on

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
            **({"volume": self.volume} if self.volume is not None else {}),
            "intensity": self.intensity.to_dict(),
            "train": [s.stem for s in self.train],
            "test": [s.stem for s in self.test],
            "unit": "case",
            "cases": {"train": _unique(s.case for s in self.train), "test": _unique(s.case for s in self.test)},
            "skipped_empty": list(self.skipped_empty),
        }


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _raise_problems(root: Path, problems: list[str]) -> None:
    """One DataError listing every offending file (the first MAX_LISTED of them), if any, on
    one line: the CLIs promise a single error line, which a log line or grep keeps whole."""
    if not problems:
        return
    shown = "; ".join(problems[:MAX_LISTED])
    more = f"; … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DataError(f"{len(problems)} problem(s) in {root}: {shown}{more}")


def _scan_folder(root: Path, intensity: Intensity) -> tuple[list[Sample], list[str]]:
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DataError(
            f"{root} is not a dataset: expected images/ and masks/ (matching stems), "
            "or images/*.nii.gz with labels/*.nii.gz"
        )
    images = files_by_stem(images_dir, PICTURE_SUFFIXES)
    masks = files_by_stem(masks_dir, IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir} holds no images ({', '.join(PICTURE_SUFFIXES)})")
    problems: list[str] = []
    samples: list[Sample] = []
    empty: list[str] = []
    for stem, ipath in images.items():
        mpath = masks.get(stem)
        if mpath is None:
            problems.append(f"{ipath.name}: no mask {stem}.* in {masks_dir}")
            continue
        try:
            image = read_prepared(ipath, intensity)[0]
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
        samples.append(Sample(stem, str(ipath), image.shape[:2], content_hash(image), k, image_path=ipath,
                              mask_path=mpath, intensity=intensity))
    _raise_problems(root, problems)
    return samples, empty


def _check_geometry(case: str, scan: Scan, label: Scan) -> Optional[str]:
    """Why a label volume does not lie on its image's voxels (None when it does)."""
    if label.data.shape != scan.data.shape:
        return f"case {case}: label volume is {label.data.shape} but image volume is {scan.data.shape}"
    if scan.affine is not None and label.affine is not None:
        off = float(np.max(np.abs(scan.affine - label.affine)))
        if off > GEOMETRY_TOL_MM:
            return (f"case {case}: label volume's affine differs from the image's by {off:.3g} mm "
                    f"(allowed {GEOMETRY_TOL_MM}); resample the label onto the image grid")
    return None


def _volume_slices(case: str, ipath: Path, image: np.ndarray, label: np.ndarray, axis: int,
                   intensity: Intensity) -> tuple[list[Sample], list[str]]:
    """A prepared (8-bit) volume and its labels → one Sample per labelled slice, and the
    stems of the unlabelled ones."""
    samples: list[Sample] = []
    empty: list[str] = []
    for k in range(image.shape[axis]):
        index = mask_to_index_map(np.rint(slice_at(label, k, axis)).astype(np.int64))
        slice_stem = f"{case}_a{axis}_{k:04d}"
        if index.max() == 0:
            empty.append(slice_stem)
            continue
        sl = np.ascontiguousarray(slice_at(image, k, axis))
        samples.append(Sample(slice_stem, f"{ipath}[axis {axis}, slice {k}]", sl.shape[:2], content_hash(sl),
                              int(index.max()), image_array=sl, index_array=index, case=case, intensity=intensity))
    return samples, empty


def _scan_volumes(root: Path, axis: int, intensity: Intensity,
                  volume: Optional[int] = None) -> tuple[list[Sample], list[str]]:
    """Every labelled slice of every case; ``volume`` picks one volume of 4-D images."""
    images = files_by_stem(root / "images", NIFTI_SUFFIXES, folders=True)
    labels = files_by_stem(root / "labels", NIFTI_SUFFIXES)
    problems: list[str] = []
    samples: list[Sample] = []
    empty: list[str] = []
    for case, ipath in images.items():
        lpath = labels.get(case)
        if lpath is None:
            problems.append(f"case {case}: no label volume {case}.nii(.gz) in {root / 'labels'}")
            continue
        try:
            scan, label = read_scan(ipath, volume=volume, strict_4d=True), read_scan(lpath, strict_4d=True)
            if not -3 <= axis < 3:
                raise InputError(f"--axis {axis} does not exist in a 3-D volume")
        except InputError as exc:
            problems.append(f"case {case}: {exc}")
            continue
        mismatch = _check_geometry(case, scan, label)
        if mismatch:
            problems.append(mismatch)
            continue
        image, _ = prepare(scan, intensity)
        found, skipped = _volume_slices(case, ipath, image, label.data, axis, intensity)
        samples += found
        empty += skipped
    _raise_problems(root, problems)
    return samples, empty


def is_volume_dataset(root: Path) -> bool:
    """images/ holds NIfTI files or DICOM series folders, next to labels/."""
    folder = root / "images"
    return folder.is_dir() and (root / "labels").is_dir() and any(
        p.name.lower().endswith(NIFTI_SUFFIXES) or (p.is_dir() and not p.name.startswith(".")) for p in folder.iterdir()
    )


is_nifti_dataset = is_volume_dataset  # the name earlier callers know


def _volume_kind(root: Path) -> str:
    entries = [p for p in (root / "images").iterdir() if not p.name.startswith(".")]
    series = any(p.is_dir() for p in entries)
    nifti = any(p.name.lower().endswith(NIFTI_SUFFIXES) for p in entries)
    return "volumes" if series and nifti else ("dicom" if series else "nifti")


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
    # By case: a 2-D file is its own case (the same permutation as a split by image), a
    # volume's slices go to one side together.
    cases = _unique(s.case for s in samples)
    order = np.random.default_rng(seed).permutation(len(cases))
    n_test = int(round(len(cases) * test_fraction))
    if len(cases) >= 2 and test_fraction > 0:
        n_test = min(max(n_test, 1), len(cases) - 1)
    test_cases = {cases[i] for i in order[:n_test].tolist()}
    train = [s for s in samples if s.case not in test_cases]
    test = [s for s in samples if s.case in test_cases]
    return train, test, source


def load_dataset(
    path: PathLike,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    split: Optional[dict[str, Any]] = None,
    axis: int = 2,
    intensity: Optional[Intensity] = None,
    volume: Optional[int] = None,
) -> Dataset:
    """Scan, validate and split a dataset folder (images + masks, or volumes + labels).

    ``split`` (train/test stem lists, e.g. from a bundle's split.json) overrides both the
    folder's split.json and the seeded split. ``axis`` slices volumes; ``intensity`` is the
    bundle's recorded intensity handling; None takes the one ``split`` records (a task's
    split.json), else ``auto``. ``volume`` picks one volume of 4-D NIfTI images.
    """
    if intensity is None:
        recorded = split.get("intensity") if isinstance(split, dict) else None
        intensity = Intensity.from_dict(recorded if isinstance(recorded, dict) else None)
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    if is_volume_dataset(root):
        samples, empty = _scan_volumes(root, axis, intensity, volume)
        kind = _volume_kind(root)
    else:
        samples, empty = _scan_folder(root, intensity)
        kind = "folder"
    if not samples:
        raise DataError(f"{root}: no image has a non-empty mask ({len(empty)} empty masks skipped)")
    train, test, source = _split(samples, root, seed, test_fraction, split)
    if not train:
        raise DataError(f"{root}: the training split is empty")
    return Dataset(root, kind, train, test, source, seed, empty, axis, intensity, volume)


def image_files(path: PathLike) -> dict[str, Path]:
    """``casam_io.image_io.image_files`` with the trainer's DataError."""
    return runtime_image_files(path, DataError)


def load_images(path: PathLike, intensity: Intensity) -> list[Sample]:
    """Images without masks (e.g. an OOD set): ``path/images/*`` or the images in ``path``.
    A volume (NIfTI or multi-frame DICOM file) counts as its middle slice, windowed over the
    whole volume: the image casam-infer segments when no slice is given.

    ``intensity`` has no default: these images are scored by a bundle's models, so they must
    be prepared with the bundle's recorded intensity handling, exactly as its task data were
    (a silent ``auto`` would feed a windowed bundle other grey levels than it was trained on).
    """
    problems: list[str] = []
    out: list[Sample] = []
    for stem, p in image_files(path).items():
        try:
            image = read_prepared(p, intensity)[0]
        except InputError as exc:
            problems.append(f"{p}: unreadable image ({exc})")
            continue
        out.append(Sample(stem, str(p), image.shape[:2], content_hash(image), 0, image_path=p, intensity=intensity))
    _raise_problems(Path(path), problems)
    return out
