"""An RT Structure Set (RTSTRUCT) of a label volume's contours, referencing its DICOM series,
written with pydicom (highdicom writes no RTSTRUCT; rt-utils is judged in docs/PACS.md).

Contours follow the pixel edges of each label on each slice, at the corners between pixels:
no smoothing, no sub-pixel guessing. Each closed loop of boundary edges is one CLOSED_PLANAR
contour; a hole is a loop of its own. The contour set therefore restores the mask exactly
under the even-odd rule at pixel centres (the inclusion–exclusion rule treatment planning
systems apply to nested contours): a pixel centre is inside an odd number of loops exactly
when the pixel was labelled. tests/test_pacs_rtstruct.py checks that bit for bit, and
dciodvfy checks the object.

One ROI per label, each contour referencing the image it lies on; the Structure Set
references the frame of reference, the study, the series and every image. A series that is
not single-frame images (a multi-frame file) gets no RTSTRUCT and a warning instead.
"""

from __future__ import annotations

import datetime
import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from casam_core import __version__
from casam_core.errors import InputError
from casam_core.files import atomic_write_bytes
from casam_core.optional import optional_import
from casam_io.scan import Scan
from casam_io.volume_io import frame_count

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"  # the class an RTReferencedStudySequence item names
#: Copied from the source when present: patient and study attributes an RTSTRUCT shares with its images.
SHARED = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
          "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")
COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 200, 200))


def rtstruct_refusal(scan: Scan) -> Optional[str]:
    """Why no RTSTRUCT can reference ``scan``'s source (a warning line), or None."""
    if not scan.datasets or (len(scan.datasets) == 1 and frame_count(scan.datasets[0]) > 1):
        return (f"no RT Structure Set for {scan.path.name}: it references single-frame images, and this source is "
                "a multi-frame file; the labels are in the NIfTI mask and the DICOM SEG")
    return None


def boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed loops of pixel-corner coordinates (row, column; corner (r, c) is the top-left
    corner of pixel (r, c)) around the ``True`` pixels of a 2-D mask, each edge used once,
    collinear corners dropped. Outer boundaries run one way, holes the other."""
    padded = np.pad(mask.astype(bool), 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # A boundary edge separates an inside pixel from an outside one. Each pixel's exposed sides
    # run the same way round it (top right→left, left top→bottom, bottom left→right, right
    # bottom→top), so shared sides never appear and every corner's in-degree equals its
    # out-degree: walking unused edges from any corner always closes a loop.
    inside = padded[1:-1, 1:-1]
    for (dr, dc), (s_r, s_c), (e_r, e_c) in (((-1, 0), (0, 1), (0, 0)), ((1, 0), (1, 0), (1, 1)),
                                              ((0, -1), (0, 0), (1, 0)), ((0, 1), (1, 1), (0, 1))):
        neighbour = padded[1 + dr:padded.shape[0] - 1 + dr, 1 + dc:padded.shape[1] - 1 + dc]
        for r, c in zip(*np.nonzero(inside & ~neighbour)):
            edges[(int(r) + s_r, int(c) + s_c)].append((int(r) + e_r, int(c) + e_c))
    loops = []
    while edges:
        start = next(iter(edges))
        loop, here = [start], start
        while True:
            following = edges[here]
            nxt = following.pop()
            if not following:
                del edges[here]
            if nxt == start:
                break
            loop.append(nxt)
            here = nxt
        loops.append(_drop_collinear(np.asarray(loop, dtype=np.int64)))
    return loops


def _drop_collinear(loop: np.ndarray) -> np.ndarray:
    """The loop's corners where its direction changes (a closed loop: the last joins the first)."""
    before = loop - np.roll(loop, 1, axis=0)
    after = np.roll(loop, -1, axis=0) - loop
    turns = (before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) != 0
    return loop[turns]


def _patient_points(ds: Any, corners: np.ndarray) -> np.ndarray:
    """Pixel-corner (row, column) coordinates → patient millimetres (x, y, z) on ``ds``'s plane.
    A pixel's centre is at its index, so corner (r, c) lies at (r − ½, c − ½)."""
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient])
    orientation = [float(v) for v in ds.ImageOrientationPatient]
    along_row, along_column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    rows, columns = corners[:, 0] - 0.5, corners[:, 1] - 0.5
    return origin + np.outer(columns * column_spacing, along_row) + np.outer(rows * row_spacing, along_column)


def _image_ref(pydicom: Any, ds: Any) -> Any:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return item


def _ds_values(pydicom: Any, points: np.ndarray) -> list[Any]:
    """DS values (16 characters at most each), as precise as that allows."""
    return [pydicom.valuerep.DSfloat(float(v), auto_format=True) for v in points.ravel()]


def _contours(pydicom: Any, scan: Scan, labels: np.ndarray, value: int) -> list[Any]:
    """The ContourSequence items of one label: every loop on every slice that has it."""
    items = []
    for k, ds in enumerate(scan.datasets):
        for loop in boundary_loops(labels[:, :, k] == value):
            item = pydicom.Dataset()
            item.ContourImageSequence = [_image_ref(pydicom, ds)]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(loop)
            item.ContourNumber = len(items) + 1
            item.ContourData = _ds_values(pydicom, _patient_points(ds, loop))
            items.append(item)
    return items


def _structure_set(pydicom: Any, scan: Scan, description: str) -> Any:
    """The RTSTRUCT's header: patient and study copied, the series new, the references set."""
    first, now = scan.datasets[0], datetime.datetime.now()
    ds = pydicom.Dataset()
    for keyword in SHARED:
        if keyword in first:
            setattr(ds, keyword, getattr(first, keyword))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2: present, possibly empty
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_CLASS, pydicom.uid.generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", pydicom.uid.generate_uid(), 901
    ds.SeriesDescription, ds.OperatorsName = description, ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "casam", "CA-SAM", __version__
    ds.InstanceNumber, ds.InstanceCreationDate, ds.InstanceCreationTime = 1, now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.StructureSetLabel, ds.StructureSetName, ds.StructureSetDescription = "CA-SAM", "CA-SAM", description
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series = pydicom.Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [_image_ref(pydicom, d) for d in scan.datasets]
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_COMPONENT_CLASS, first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID  # the Frame of Reference module (PS3.3 A.19.3)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    return ds


def rt_structure_set(scan: Scan, labels: np.ndarray, names: Mapping[int, str], description: str) -> Any:
    """The RTSTRUCT dataset (None when no label is present): one ROI per label value."""
    pydicom = optional_import("pydicom", "medical", "writing an RT Structure Set", InputError)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        return None
    if "FrameOfReferenceUID" not in scan.datasets[0]:
        raise InputError(f"no RT Structure Set for {scan.path.name}: its images name no frame of reference")
    ds = _structure_set(pydicom, scan, description)
    rois, contours, observations = [], [], []
    for number, value in enumerate(present, start=1):
        roi = pydicom.Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, scan.datasets[0].FrameOfReferenceUID
        roi.ROIName, roi.ROIGenerationAlgorithm = names.get(value, f"label {value}")[:64], "AUTOMATIC"
        roi.ROIGenerationDescription = description
        rois.append(roi)
        contour = pydicom.Dataset()
        contour.ReferencedROINumber, contour.ROIDisplayColor = number, list(COLOURS[(number - 1) % len(COLOURS)])
        contour.ContourSequence = _contours(pydicom, scan, labels, value)
        contours.append(contour)
        observation = pydicom.Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "", ""
        observations.append(observation)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = rois, contours, observations
    return ds


def rtstruct_bytes(ds: Any) -> bytes:
    """``ds`` as a DICOM Part 10 file (explicit VR little endian)."""
    pydicom = optional_import("pydicom", "medical", "writing an RT Structure Set", InputError)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:  # pydicom 2.x names the same choice write_like_original=False
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def write_rtstruct(path: Path, scan: Scan, labels: np.ndarray, names: Mapping[int, str], description: str) -> bool:
    """Write the RTSTRUCT to ``path`` (atomically); False when no label is present."""
    ds = rt_structure_set(scan, labels, names, description)
    if ds is None:
        return False
    atomic_write_bytes(path, rtstruct_bytes(ds))
    return True


__all__: Sequence[str] = ["boundary_loops", "rt_structure_set", "rtstruct_refusal", "write_rtstruct"]
