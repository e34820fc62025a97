"""NIfTI and DICOM readers with geometry: volumes as X×Y×Z arrays plus a voxel → RAS affine.

A DICOM series folder becomes one volume with its slices sorted along the slice normal and
stacked on the last axis (rows × columns × slices, so a slice is shown as the scanner
shows it). The series is refused, with one line, when its slices differ in size or
orientation, or leave a gap in slice positions (a warning instead with ``allow_gaps``): a
volume with a missing slice would give a mask that no longer lines up with the anatomy. Two
slices at one position (a duplicated file) are refused even with ``allow_gaps``.

A multi-frame file (an enhanced CT/MR image, or a legacy multi-frame file) is read the same
way, frames as slices: its geometry, rescale and VOI window come from the per-frame and
shared functional groups (PS3.3 C.7.6.16) or, in a legacy file, from the top level; enhanced
frames are sorted along the slice normal and checked for gaps like a series' files.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from casam_core.errors import InputError
from casam_core.optional import optional_import
from casam_io.intensity import Source
from casam_io.scan import Scan, check_pixels

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOL = 1e-4  # direction cosines are written with ~6 decimals
GAP_TOL = 0.05  # a spacing more than 5 % off the median spacing is a gap (or an overlap)


#: Library warnings about a value that casam copies verbatim from the source file into what it
#: writes (a DICOM SEG copies the Patient and Study modules, PS3.3 C.8.20): the standard wants
#: the value as it is, so a complaint about its form is dropped, not shown.
VERBATIM_COPY_WARNINGS = ("is unlikely to represent the intended person name",)
_DICOM_LIBRARIES = (f"{os.sep}pydicom{os.sep}", f"{os.sep}highdicom{os.sep}")


class SourceMetadataWarning(UserWarning):
    """Problems that pydicom or highdicom found in a source file's own metadata, one per file."""


@contextmanager
def source_metadata_warnings(label: str) -> Iterator[None]:
    """Collect the warnings pydicom and highdicom raise about the source file's own metadata
    (an invalid date, a badly formed name) into one casam warning naming ``label``.

    Such warnings are about the hospital's file, not about what casam did, and a series of
    300 slices would otherwise repeat the same paragraph 300 times. Complaints about values
    casam copies verbatim (VERBATIM_COPY_WARNINGS) are dropped. Other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    notes: list[str] = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if any(part in text for part in VERBATIM_COPY_WARNINGS):
            continue
        if any(lib in str(w.filename) for lib in _DICOM_LIBRARIES):
            if text not in notes:
                notes.append(text)
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if notes:
        first = notes[0] if len(notes[0]) <= 160 else notes[0][:157] + "..."
        more = f" (and {len(notes) - 1} more)" if len(notes) > 1 else ""
        warnings.warn(f"{label}: its metadata has {len(notes)} problem(s) that casam keeps as they are: {first}{more}",
                      SourceMetadataWarning, stacklevel=3)


def _nib() -> Any:
    return optional_import("nibabel", "medical", "reading NIfTI", InputError)


def _pydicom() -> Any:
    return optional_import("pydicom", "medical", "reading DICOM", InputError)


# ----- NIfTI ---------------------------------------------------------------------------------
def read_nifti(path: Path, volume: Optional[int] = None, strict_4d: bool = False) -> Any:
    """A NIfTI file → Scan of one 3-D volume (trailing singleton axes dropped).

    A 4-D file needs ``volume``; without it volume 0 is used with a warning that offers
    ``--volume K``, or, with ``strict_4d``, it is refused.
    """

    nib = _nib()
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        warnings: list[str] = []
        if len(shape) > 4:
            raise InputError(f"NIfTI file {path} has {len(shape)} dimensions {shape}; casam reads 2-, 3- and 4-D files")
        if len(shape) == 4:
            n = shape[3]
            if volume is None:
                if strict_4d:
                    raise InputError(f"NIfTI file {path} is 4-D with {n} volumes; choose one with --volume K (0..{n - 1})")
                warnings.append(f"4-D NIfTI with {n} volumes: using volume 0; choose another with --volume K (0..{n - 1})")
                volume = 0
            if not 0 <= volume < n:
                raise InputError(f"--volume {volume} is outside {path}, which has {n} volumes (0..{n - 1})")
            data = np.asarray(img.dataobj[..., volume])
        else:
            if volume not in (None, 0):
                raise InputError(f"--volume {volume} given, but {path} is not 4-D (shape {shape})")
            data = np.asarray(img.dataobj).reshape(shape)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise InputError(f"NIfTI file {path} is unreadable ({exc})") from exc
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(f"NIfTI file {path} has shape {data.shape}; expected a 2-, 3- or 4-D volume")
    return Scan(path, data, Source(kind="volume"), affine=np.asarray(img.affine, np.float64), header=img.header,
                warnings=warnings)


# ----- DICOM ---------------------------------------------------------------------------------
def _first(value: Any) -> float:
    """A DICOM value that may be multi-valued (WindowCenter often is) → its first number."""
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") else float(value)
    except (TypeError, ValueError, IndexError):
        return float("nan")


def _group_item(ds: Any, frame: int, name: str) -> Any:
    """Functional-group macro ``name`` (e.g. PlanePositionSequence) of frame ``frame`` of a
    multi-frame file: the per-frame item, else the shared one, else None (PS3.3 C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        sequence = ds.get(groups)
        if sequence is not None and index < len(sequence):
            inner = sequence[index].get(name)
            if inner is not None and len(inner) > 0:
                return inner[0]
    return None


def _rescale(ds: Any, frame: int = 0) -> tuple[float, float]:
    """(slope, intercept): the file's RescaleSlope/Intercept, or, in an enhanced multi-frame
    file, those of frame ``frame``'s pixel value transformation (per-frame or shared)."""
    slope, intercept = getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None)
    if slope is None:
        item = _group_item(ds, frame, "PixelValueTransformationSequence")
        if item is not None:
            slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    return (1.0 if slope is None else float(slope)), (0.0 if intercept is None else float(intercept))


def _voi(ds: Any, frame: Optional[int] = None) -> Optional[tuple[float, float]]:
    """The file's VOI window (center, width), or, in an enhanced multi-frame file, frame
    ``frame``'s (FrameVOILUTSequence, per-frame or shared)."""
    item = ds if "WindowCenter" in ds else (None if frame is None else _group_item(ds, frame, "FrameVOILUTSequence"))
    if item is None or "WindowCenter" not in item or "WindowWidth" not in item:
        return None
    center, width = _first(item.WindowCenter), _first(item.WindowWidth)
    return (center, width) if np.isfinite(center) and np.isfinite(width) and width > 0 else None


def _source(ds: Any, kind: str, frame: Optional[int] = None) -> Source:
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = not photometric.startswith("MONOCHROME")
    return Source(kind=kind, voi=None if colour else _voi(ds, frame), invert=photometric == "MONOCHROME1", pil=colour)


def _decoded(ds: Any, path: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        raise InputError(f"DICOM file {path} has unreadable pixel data ({exc})") from exc


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """Decoded pixels with RescaleSlope/Intercept applied (float32 only when they change values)."""
    array = _decoded(ds, path)
    slope, intercept = _rescale(ds)
    if slope != 1.0 or intercept != 0.0:
        array = array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return array


def _frame_pixels(ds: Any, path: Path, frames: int) -> np.ndarray:
    """A multi-frame file's frames × rows × columns pixels, each frame under its own rescale:
    the same float32 products and sums as ``_pixels``, so a frame reads as the same slice
    stored as a single file would."""
    array = _decoded(ds, path)
    if array.ndim != 3 or array.shape[0] != frames:
        raise InputError(f"DICOM file {path} is a colour multi-frame file; casam reads greyscale volumes")
    rescale = np.asarray([_rescale(ds, k) for k in range(frames)], np.float64)
    if np.all(rescale == (1.0, 0.0)):
        return array
    slopes, intercepts = (rescale[:, i].astype(np.float32)[:, None, None] for i in (0, 1))
    return array.astype(np.float32) * slopes + intercepts


def _read_dataset(path: Path, max_pixels: Optional[int], header_only: bool = False) -> Any:

    pydicom = _pydicom()
    try:
        with source_metadata_warnings(f"DICOM file {path}"):
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad files
        raise InputError(f"DICOM file {path} is unreadable ({exc})") from exc
    if "Rows" in ds and "Columns" in ds:
        check_pixels(int(ds.Columns), int(ds.Rows), max_pixels, path)
    return ds


def frame_count(ds: Any) -> int:
    """NumberOfFrames (1 when absent or empty)."""
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def read_dicom_file(path: Path, max_pixels: Optional[int] = None, allow_gaps: bool = False) -> Any:
    """One DICOM file: a single frame → a 2-D image; several frames → a rows × columns ×
    frames volume, its frames in slice order (see ``multiframe_layout``)."""

    ds = _read_dataset(path, max_pixels)
    frames = frame_count(ds)
    if frames == 1:
        return Scan(path, _pixels(ds, path), _source(ds, "image"))
    pixels = _frame_pixels(ds, path, frames)
    order, affine, warnings = multiframe_layout(ds, path, allow_gaps)
    if np.array_equal(order, np.arange(frames)):
        volume = np.ascontiguousarray(np.moveaxis(pixels, 0, -1))
    else:
        volume = np.ascontiguousarray(np.moveaxis(pixels[order], 0, -1))
    del ds.PixelData
    # The VOI of the middle slice: edge frames of a file windowed frame by frame (as Philips
    # enhanced MR is) hold mostly air, and their windows show nothing of the anatomy.
    source = _source(ds, "volume", frame=int(order[frames // 2]))
    return Scan(path, volume, source, affine=affine, datasets=[ds], warnings=warnings)


def _frame_geometry(ds: Any, frames: int, path: Path) -> Optional[tuple[list[float], list[float], np.ndarray]]:
    """(orientation, pixel spacing, frames × 3 positions in LPS mm) of a multi-frame file, or
    None when it lacks them. Enhanced files give them per frame (or shared); a legacy file
    gives one position and orientation and SpacingBetweenSlices at the top level. Frames
    that differ in orientation or pixel spacing are refused: they make no one volume."""
    try:
        if "PerFrameFunctionalGroupsSequence" in ds:
            orients, spacings, positions = [], [], []
            for k in range(frames):
                orient, measures, position = (_group_item(ds, k, name) for name in (
                    "PlaneOrientationSequence", "PixelMeasuresSequence", "PlanePositionSequence"))
                if orient is None or measures is None or position is None:
                    return None
                orients.append([float(v) for v in orient.ImageOrientationPatient])
                spacings.append([float(v) for v in measures.PixelSpacing])
                positions.append([float(v) for v in position.ImagePositionPatient])
        elif all(k in ds for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
                                   "SpacingBetweenSlices")):
            orient = [float(v) for v in ds.ImageOrientationPatient]
            step = float(ds.SpacingBetweenSlices) * np.cross(orient[:3], orient[3:6])
            orients, spacings = [orient], [[float(v) for v in ds.PixelSpacing]]
            positions = [np.asarray([float(v) for v in ds.ImagePositionPatient]) + k * step for k in range(frames)]
        else:
            return None
    except (AttributeError, TypeError, ValueError):
        return None
    for k, (orient, spacing) in enumerate(zip(orients, spacings)):
        if not np.allclose(orient, orients[0], atol=ORIENTATION_TOL):
            raise InputError(f"DICOM file {path}: frame {k + 1} has orientation {orient}, frame 1 has {orients[0]}; "
                             "frames must share one orientation")
        if not np.allclose(spacing, spacings[0], rtol=1e-4):
            raise InputError(f"DICOM file {path}: frame {k + 1} has pixel spacing {spacing}, frame 1 has "
                             f"{spacings[0]}; frames must share one pixel spacing")
    return orients[0], spacings[0], np.asarray(positions, np.float64)


def multiframe_layout(ds: Any, path: Path,
                      allow_gaps: bool = False) -> tuple[np.ndarray, Optional[np.ndarray], list[str]]:
    """(the source frame of each slice, the voxel → RAS affine, warnings) of a multi-frame
    file. Frames are sorted along the slice normal, as a series' files are, and refused (or,
    with ``allow_gaps``, warned about) when their positions leave a gap. Without geometry the
    frames keep their order and the affine is None. The DICOM SEG writer maps slices back
    to source frames with the same order."""
    frames = frame_count(ds)
    geometry = _frame_geometry(ds, frames, path)
    if geometry is None:
        return np.arange(frames), None, []
    orient, spacing, positions = geometry
    along = positions @ np.cross(orient[:3], orient[3:6])
    order = np.argsort(along, kind="stable")
    warnings = _check_gaps(along[order], path, allow_gaps, what="DICOM multi-frame file",
                           names=[f"frame {int(k) + 1}" for k in order])
    return order, _affine(orient, spacing, positions[order[0]], positions[order[-1]], frames), warnings


def has_frame_positions(ds: Any) -> bool:
    """Whether each frame of a multi-frame file carries its own plane position, which a DICOM
    SEG needs to reference it (highdicom reads them from the per-frame functional groups)."""
    frames = frame_count(ds)
    return "PerFrameFunctionalGroupsSequence" in ds and len(ds.PerFrameFunctionalGroupsSequence) == frames and all(
        _group_item(ds, k, "PlanePositionSequence") is not None for k in range(frames))


def _affine(orient: list[float], spacing: list[float], first: np.ndarray, last: np.ndarray, n: int) -> np.ndarray:
    """Voxel (row, column, slice) → RAS mm. IOP's first triplet is the direction of
    increasing column index, its second that of increasing row index (DICOM PS3.3 C.7.6.2)."""
    row_dir, col_dir = np.asarray(orient[:3]), np.asarray(orient[3:6])
    lps = np.eye(4)
    lps[:3, 0] = col_dir * spacing[0]  # along rows index: row spacing × column direction
    lps[:3, 1] = row_dir * spacing[1]
    lps[:3, 2] = (last - first) / (n - 1) if n > 1 else np.cross(row_dir, col_dir)
    lps[:3, 3] = first
    return LPS_TO_RAS @ lps


def is_dicom_series(folder: Path, picture_suffixes: tuple[str, ...]) -> bool:
    """A folder that holds a DICOM series (and no pictures): its first file is DICOM with a
    slice position. A folder of single DICOM images without positions is not a series; a
    folder holding just one multi-frame file (as scanners export them) reads as that file."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files or any(p.name.lower().endswith(picture_suffixes) for p in files):
        return False
    try:
        ds = _pydicom().dcmread(str(sorted(files)[0]), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM
        return False
    if frame_count(ds) > 1:
        return len(files) == 1
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"folder {folder} holds no files; expected a DICOM series")
    return files


def _geometry(datasets: list[Any], paths: list[Path], folder: Path) -> tuple[list[float], list[float], np.ndarray]:
    """(orientation, pixel spacing, each slice's position along the normal), refusing a series
    whose slices differ in size, orientation or spacing."""
    first = datasets[0]
    try:
        orient = [float(v) for v in first.ImageOrientationPatient]
        spacing = [float(v) for v in first.PixelSpacing]
        positions = [np.asarray([float(v) for v in ds.ImagePositionPatient]) for ds in datasets]
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"DICOM series {folder} lacks ImageOrientationPatient, PixelSpacing or ImagePositionPatient") from exc
    size = (int(first.Rows), int(first.Columns))
    for ds, path in zip(datasets, paths):
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise InputError(f"DICOM series {folder}: {path.name} is {int(ds.Rows)}×{int(ds.Columns)}, "
                             f"{paths[0].name} is {size[0]}×{size[1]}; slices must have one size")
        other = [float(v) for v in getattr(ds, "ImageOrientationPatient", [np.nan] * 6)]
        if not np.allclose(other, orient, atol=ORIENTATION_TOL):
            raise InputError(f"DICOM series {folder}: {path.name} has orientation {other}, "
                             f"{paths[0].name} has {orient}; slices must share one orientation")
    normal = np.cross(orient[:3], orient[3:6])
    return orient, spacing, np.asarray([float(p @ normal) for p in positions])


def _check_gaps(along: np.ndarray, folder: Path, allow_gaps: bool, what: str = "DICOM series",
                names: Optional[list[str]] = None) -> list[str]:
    """Warnings about uneven slice positions (an error without ``allow_gaps``).

    Two slices at one position (a copied file, or two series in one folder) are refused even
    with ``allow_gaps``: no slice order is right for them, and a mask written over them would
    reference one position twice (a DICOM SEG cannot be made of it). ``names`` label the slices
    (file names, or frames), in the sorted order of ``along``."""
    steps = np.diff(along)
    if steps.size == 0:
        return []
    step = float(np.median(steps))
    if abs(step) < 1e-6:
        raise InputError(f"{what} {folder} has several slices at one position (duplicates or several series)")
    same = np.flatnonzero(np.abs(steps) <= GAP_TOL * abs(step))
    if same.size:
        i = int(same[0])
        label = names or [f"slice {k + 1}" for k in range(along.size)]
        raise InputError(f"{what} {folder}: {label[i]} and {label[i + 1]} lie at one slice position "
                         f"({along[i]:.2f} mm), a duplicated slice or a second series; remove one (--allow-gaps "
                         "does not cover it)")
    bad = np.flatnonzero(np.abs(steps - step) > GAP_TOL * abs(step))
    if bad.size == 0:
        return []
    where = ", ".join(f"{along[i]:.2f}→{along[i + 1]:.2f} mm" for i in bad[:3])
    message = f"{what} {folder} has uneven slice positions (step {abs(step):.3g} mm; at {where})"
    if not allow_gaps:
        raise InputError(message + "; pass --allow-gaps to use it anyway")
    return [message + "; used anyway (--allow-gaps)"]


def read_dicom_series(folder: Path, max_pixels: Optional[int] = None, allow_gaps: bool = False) -> Any:
    """A folder holding one DICOM series → rows × columns × slices volume, sorted along the
    slice normal, with its affine and the slices' headers (pixel data dropped)."""

    paths = _series_files(folder)
    headers = [_read_dataset(p, max_pixels, header_only=True) for p in paths]
    multiframe = [p.name for p, ds in zip(paths, headers) if frame_count(ds) > 1]
    if multiframe and len(paths) == 1:  # a scanner's export folder holding one enhanced file
        return read_dicom_file(paths[0], max_pixels=max_pixels, allow_gaps=allow_gaps)
    if multiframe:
        raise InputError(f"folder {folder} holds multi-frame DICOM files ({', '.join(multiframe[:3])}) among others; "
                         "give one multi-frame file, or a folder of single-frame slices")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise InputError(f"folder {folder} mixes {len(series)} DICOM series; give one series per folder")
    orient, spacing, along = _geometry(headers, paths, folder)
    order = np.argsort(along, kind="stable")
    along, paths = along[order], [paths[i] for i in order]
    warnings = _check_gaps(along, folder, allow_gaps, names=[p.name for p in paths])
    slices, datasets = [], []
    for path in paths:
        ds = _read_dataset(path, max_pixels)
        slices.append(_pixels(ds, path))
        del ds.PixelData
        datasets.append(ds)
    if slices[0].ndim != 2:
        raise InputError(f"DICOM series {folder} holds colour slices; casam reads greyscale series")
    dtype = np.result_type(*[s.dtype for s in slices])
    volume = np.stack([s.astype(dtype, copy=False) for s in slices], axis=-1)
    first = np.asarray([float(v) for v in datasets[0].ImagePositionPatient])
    last = np.asarray([float(v) for v in datasets[-1].ImagePositionPatient])
    affine = _affine(orient, spacing, first, last, len(datasets))
    # The VOI window of the middle slice, as for a multi-frame file: a series' first and last
    # slices are often windowed on air.
    source = _source(datasets[len(datasets) // 2], "volume")
    return Scan(folder, volume, source, affine=affine, datasets=datasets, warnings=warnings)
