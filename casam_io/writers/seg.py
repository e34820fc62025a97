"""A binary DICOM Segmentation (highdicom) that references every source SOPInstanceUID (and,
for a multi-frame source, every source frame), so a PACS, 3D Slicer or OHIF shows it over
the series. A source it cannot reference gets no SEG and a warning line instead."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from casam_core import __version__
from casam_core.cli_frame import one_line
from casam_core.errors import InputError
from casam_core.files import atomic_write_bytes
from casam_core.optional import optional_import
from casam_io.scan import Scan
from casam_io.volume_io import frame_count, has_frame_positions, multiframe_layout, source_metadata_warnings


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


def seg_identity(route: Optional[str]) -> tuple[str, dict[str, str]]:
    """(SeriesDescription, algorithm parameters): the route the volume took and casam's
    version, so a PACS listing shows which alignment made a SEG (LO holds 64 characters)."""
    if route is None:
        return "CA-SAM segmentation", {}
    return f"CA-SAM {route} (casam {__version__})"[:64], {"route": route[:64]}


def dicom_seg(scan: Scan, labels: np.ndarray, names: Mapping[int, str], route: Optional[str] = None) -> Any:
    """A binary DICOM SEG with one segment per label, one frame per source slice (or frame);
    the route (if given) and casam's version are in its SeriesDescription and in every
    segment's algorithm identification (parameter ``route``); ContentCreatorName is casam."""
    hd = optional_import("highdicom", "medical", "writing DICOM SEG", InputError)
    codes = optional_import("pydicom.sr.codedict", "medical", "writing DICOM SEG", InputError).codes

    description, parameters = seg_identity(route)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        return None
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=names.get(v, f"label {v}"),
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(name="CA-SAM", version=__version__,
                                                                        family=codes.cid7162.ArtificialIntelligence,
                                                                        parameters=parameters or None),
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
            software_versions=__version__, device_serial_number="casam", series_description=description,
            content_creator_name="casam^CA-SAM",
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


def write_dicom_seg(path: Path, scan: Scan, labels: np.ndarray, names: Mapping[int, str],
                    route: Optional[str] = None) -> bool:
    seg = dicom_seg(scan, labels, names, route)
    if seg is None:
        return False
    buf = io.BytesIO()
    seg.save_as(buf)
    atomic_write_bytes(path, buf.getvalue())
    return True
