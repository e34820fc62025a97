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

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
from PIL import Image

from casam_core.files import atomic_write_bytes, atomic_write_json
from casam_infer.outputs import overlay
from casam_io.image_io import Scan
from casam_io.writers.nifti import write_nifti_mask
from casam_io.writers.png import png_bytes
from casam_io.writers.seg import SegRefused, seg_refusal, write_dicom_seg
from runtime.volume import VolumeResult

MONTAGE_TILES = 16  # at most this many segmented slices in the montage
MONTAGE_TILE_PX = 256


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
                if write_dicom_seg(folder / f"{stem}_seg.dcm", scan, result.labels, names, result.route):
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
