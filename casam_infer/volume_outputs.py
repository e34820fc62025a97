"""What casam-infer leaves on disk for a volume: a NIfTI label volume, a DICOM SEG for DICOM
input, a PNG montage, and a JSON record written last.

``<stem>_mask.nii.gz`` has the input's shape, affine and qform/sform (codes included), with
uint8 labels, so it overlays the input in any viewer. For DICOM input ``<stem>_seg.dcm`` is
a DICOM Segmentation (highdicom) that references every source SOPInstanceUID (and, for a
multi-frame source, every source frame), so a PACS, 3D Slicer or OHIF shows it over the
series. A source it cannot reference (a legacy multi-frame file without per-frame
positions) gets no SEG and one warning; the NIfTI mask holds the labels either way.
"""

from __future__ import annotations

import gzip
from contextlib import contextmanager
import io
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
from PIL import Image

from casam_core import __version__
from casam_core.cli_frame import one_line
from casam_core.errors import InputError
from casam_core.optional import optional_import
from casam_core.files import atomic_write_bytes, atomic_write_json
from casam_io.image_io import Scan
from casam_infer.outputs import overlay, png_bytes
from runtime.volume import VolumeResult
from casam_io.volume_io import frame_count, has_frame_positions, multiframe_layout, source_metadata_warnings

MONTAGE_TILES = 16  # at most this many segmented slices in the montage
MONTAGE_TILE_PX = 256


def nifti_mask(scan: Scan, labels: np.ndarray) -> Any:
    """A uint8 label image on the input's grid: NIfTI input keeps its header (qform and
    sform with their codes); DICOM input gets its scanner affine as both."""
    import nibabel as nib

    if scan.header is not None and isinstance(scan.header, nib.Nifti1Header):
        header = scan.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        return nib.Nifti1Image(labels, None, header=header)  # affine None: qform and sform come from the header
    if scan.affine is None:
        raise InputError(f"{scan.path} has no geometry; cannot write a NIfTI mask for it")
    image = nib.Nifti1Image(labels, scan.affine)
    image.set_qform(scan.affine, code=1)
    image.set_sform(scan.affine, code=1)
    return image


def write_nifti_mask(path: Path, scan: Scan, labels: np.ndarray) -> None:
    """A .nii.gz is the gzip of the single-file .nii bytes; written atomically."""
    atomic_write_bytes(path, gzip.compress(nifti_mask(scan, labels).to_bytes(), compresslevel=6))


def seg_refusal(scan: Scan) -> Optional[str]:
    """Why no DICOM SEG can reference ``scan``'s source (a warning line), or None when one can."""
    if len(scan.datasets) == 1 and frame_count(scan.datasets[0]) > 1 and not has_frame_positions(scan.datasets[0]):
        return (f"no DICOM SEG for {scan.path.name}: this multi-frame file gives no per-frame positions for a "
                "SEG to reference (a legacy multi-frame file); the labels are in the NIfTI mask")
    return None


def _source_frames(scan: Scan, frames: np.ndarray) -> np.ndarray:
    """SEG frames (one per slice, in slice order) → one per source frame, in the source's
    order: highdicom pairs segmentation frame i with frame i of a multi-frame source, whose
    frames the reader may have sorted (casam_io.volume_io.multiframe_layout)."""
    if len(scan.datasets) != 1 or frame_count(scan.datasets[0]) == 1:
        return frames
    order, _, _ = multiframe_layout(scan.datasets[0], scan.path, allow_gaps=True)
    return frames[np.argsort(order)]


def dicom_seg(scan: Scan, labels: np.ndarray, names: Mapping[int, str]) -> Any:
    """A binary DICOM SEG with one segment per label, one frame per source slice (or frame)."""
    hd = optional_import("highdicom", "medical", "writing DICOM SEG", InputError)
    codes = optional_import("pydicom.sr.codedict", "medical", "writing DICOM SEG", InputError).codes

    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        return None
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=names.get(v, f"label {v}"),
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(name="CA-SAM", version=__version__,
                                                                        family=codes.cid7162.ArtificialIntelligence),
        )
        for i, v in enumerate(present, start=1)
    ]
    # Renumber to 1..n segments and put frames first, in the source slices' order.
    remap = np.zeros(256, np.uint8)
    remap[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
    frames = np.ascontiguousarray(_source_frames(scan, np.moveaxis(remap[labels], -1, 0)))
    with source_metadata_warnings(f"DICOM SEG of {scan.path}"), _source_refusals(scan):
        return hd.seg.Segmentation(
            source_images=scan.datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="casam", manufacturer_model_name="CA-SAM",
            software_versions=__version__, device_serial_number="casam", series_description="CA-SAM segmentation",
        )


class SegRefused(InputError):
    """highdicom refused to build a SEG from the source's own header (an invalid date, a
    PatientSex of 'X' …): the labels are still written as NIfTI, with a warning."""


@contextmanager
def _source_refusals(scan: Scan) -> Iterator[None]:
    """highdicom validates the patient and study attributes it copies from the source and
    raises ValueError on a value the standard does not allow; that is the source's problem,
    not a crash of casam's."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise SegRefused(f"no DICOM SEG for {scan.path.name}: its source header has a value a SEG may not copy "
                         f"({one_line(exc)}); the labels are in the NIfTI mask") from exc


def write_dicom_seg(path: Path, scan: Scan, labels: np.ndarray, names: Mapping[int, str]) -> bool:
    seg = dicom_seg(scan, labels, names)
    if seg is None:
        return False
    buf = io.BytesIO()
    seg.save_as(buf)
    atomic_write_bytes(path, buf.getvalue())
    return True


def montage(result: VolumeResult, slice_image: Any, axis: int) -> Optional[np.ndarray]:
    """Up to MONTAGE_TILES segmented slices, evenly chosen, tinted per label, in a grid."""
    moved = np.moveaxis(result.labels, axis, 0)
    segmented = [k for k in range(moved.shape[0]) if moved[k].any()]
    if not segmented:
        return None
    picks = [segmented[i] for i in np.linspace(0, len(segmented) - 1, min(MONTAGE_TILES, len(segmented))).round().astype(int)]
    tiles = []
    for k in dict.fromkeys(picks):
        lab = moved[k]
        values = [v for v in np.unique(lab) if v != 0]
        tile = Image.fromarray(overlay(slice_image(k), np.stack([lab == v for v in values])))
        tile.thumbnail((MONTAGE_TILE_PX, MONTAGE_TILE_PX))
        tiles.append(np.asarray(tile))
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    grid = np.zeros((rows * th, cols * tw, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * th:r * th + t.shape[0], c * tw:c * tw + t.shape[1]] = t
    return grid


def volume_record(scan: Scan, result: VolumeResult, axis: int, outputs: Mapping[str, Optional[str]],
                  fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON record of a volume; ``fields`` end it (the backend, the evaluation)."""
    moved = np.moveaxis(result.labels, axis, 0)
    structures = []
    for v in sorted(int(x) for x in np.unique(result.labels) if x != 0):
        on = [k for k in range(moved.shape[0]) if (moved[k] == v).any()]
        structures.append({"label": v, "slices": [on[0], on[-1]], "voxels": int((result.labels == v).sum())})
    return {
        "image": str(scan.path),
        "kind": "volume",
        "shape": list(result.labels.shape),
        "axis": axis,
        "route": result.route,
        "route_mode": result.route_mode,
        "mean_scores": result.mean_scores,
        "thresholds": result.thresholds,
        "passes": result.passes,
        "structures": structures,
        "slices": [{"index": r.index, "route": r.route, "scores": r.scores, "prompts": r.prompts}
                   for r in result.slices.values()],
        "outputs": dict(outputs),
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        "warnings": list(result.warnings),
        **dict(fields),
    }


def write_volume_outputs(folder: Path, stem: str, scan: Scan, result: VolumeResult, axis: int, with_overlay: bool,
                         slice_image: Callable[[int], np.ndarray], fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write the NIfTI mask, the SEG (DICOM input), the montage, then the JSON record, into
    ``folder`` (the staging folder of casam_core.ownership.OutputDir.group: the files appear
    in --out together, or none of them)."""
    outputs: dict[str, Optional[str]] = {"mask": f"{stem}_mask.nii.gz", "seg": None, "overlay": None}
    write_nifti_mask(folder / f"{stem}_mask.nii.gz", scan, result.labels)
    warnings: list[str] = []
    if scan.datasets:
        refusal = seg_refusal(scan)
        names = {v: f"label {v}" for v in range(1, 256)}
        if refusal is not None:
            warnings.append(refusal)
        else:
            try:
                if write_dicom_seg(folder / f"{stem}_seg.dcm", scan, result.labels, names):
                    outputs["seg"] = f"{stem}_seg.dcm"
            except SegRefused as exc:
                warnings.append(str(exc))
    if with_overlay:
        grid = montage(result, slice_image, axis)
        if grid is not None:
            outputs["overlay"] = f"{stem}_overlay.png"
            atomic_write_bytes(folder / f"{stem}_overlay.png", png_bytes(grid))
    record = volume_record(scan, result, axis, outputs, fields)
    record["warnings"] += warnings
    atomic_write_json(folder / f"{stem}.json", record)
    return record
