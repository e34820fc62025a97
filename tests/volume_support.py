"""Synthetic volumes with known geometry for the volume tests: a sphere in a NIfTI with an
oblique affine, and a CT series written slice by slice with pydicom."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def oblique_affine(spacing: tuple[float, float, float] = (0.8, 0.9, 2.5), degrees: float = 20.0) -> np.ndarray:
    """Voxel → RAS with a rotation about two axes and a translation: nothing axis-aligned."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = (-31.5, 12.25, -80.0)
    return affine


def sphere_volume(shape: tuple[int, int, int] = (64, 64, 12), center: tuple[float, float, float] = (30, 34, 6),
                  radius_mm: float = 14.0, spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int16 CT-like volume in HU, uint8 sphere label): a bright sphere (≈ +300 HU) in soft
    tissue (≈ 40 HU) with noise; the radius is in millimetres, so it spans fewer slices
    along the coarse axis."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    dist = np.linalg.norm((idx - np.asarray(center)) * np.asarray(spacing), axis=-1)
    label = (dist <= radius_mm).astype(np.uint8)
    rng = np.random.default_rng(seed)
    volume = np.where(label, 300.0, 40.0) + rng.normal(0, 15, shape)
    volume[:4] = -1000.0  # air at one side: a percentile window must not be fooled by it
    return volume.astype(np.int16), label


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, str(path))
    return path


def _tilted_axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, slice normal) of an oblique (tilted) acquisition."""
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.96, -0.28])
    col_dir /= np.linalg.norm(col_dir)
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _ct_header(ds, sop_class: str, sop: str, study: str, series: str, frame_of_ref: str, rows: int, cols: int,
               photometric: str, number: int) -> None:
    """The patient, study, series and image-pixel attributes every synthetic CT file shares
    (16-bit signed stored values)."""
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Sphere", "casam-0", "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date(2026, 1, 2).strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "1", "", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, number
    ds.Manufacturer = "casam-tests"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1


def _stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU → the int16 values a scanner stores under RescaleSlope/Intercept."""
    return np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.int16)


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float] = (0.7, 0.8, 3.0),
                       slope: float = 1.0, intercept: float = -1024.0, photometric: str = "MONOCHROME2",
                       window: Optional[tuple[float, float]] = (40.0, 400.0), shuffle: bool = True,
                       skip: tuple[int, ...] = ()) -> list[str]:
    """A CT series, one file per slice of ``volume`` (rows × columns × slices, in HU), with
    stored = (HU − intercept) / slope. Files are named in a shuffled order, so a reader must
    sort by position. Returns the SOPInstanceUIDs in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = volume.shape
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    row_dir, col_dir, normal = _tilted_axes()
    order = np.random.default_rng(5).permutation(n) if shuffle else np.arange(n)
    uids = []
    for k in range(n):
        sop = generate_uid()
        uids.append(sop)
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        _ct_header(ds, CTImageStorage, sop, study, series, frame_of_ref, rows, cols, photometric, k + 1)
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array([-40.0, -30.0, 100.0]) + k * spacing[2] * normal]
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
        ds.PixelData = _stored(volume[:, :, k], slope, intercept).tobytes()
        ds.save_as(str(folder / f"IM{order[k]:04d}"), enforce_file_format=True)
    return uids


def write_multiframe_dicom(path: Path, volume: np.ndarray, spacing: tuple[float, float, float] = (0.7, 0.8, 3.0),
                           slopes: Sequence[float] = (1.0,), intercepts: Sequence[float] = (-1024.0,),
                           photometric: str = "MONOCHROME2", window: Optional[tuple[float, float]] = (40.0, 400.0),
                           frame_order: Optional[Sequence[int]] = None, enhanced: bool = True) -> str:
    """One multi-frame CT file holding ``volume`` (rows × columns × slices, in HU) on the
    same tilted grid as ``write_dicom_series``; returns its SOPInstanceUID.

    ``enhanced``: an Enhanced CT Image (geometry, rescale and VOI window in the shared and
    per-frame functional groups); else a legacy multi-frame file with them at the top level
    and SpacingBetweenSlices. Frame ``i`` holds slice ``frame_order[i]`` (default: in
    order), so a reader must sort enhanced frames by position. One slope and intercept, or
    one per slice (per-frame rescale, enhanced only).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    rows, cols, n = volume.shape
    order = list(range(n)) if frame_order is None else [int(k) for k in frame_order]
    per_slice = lambda values: [float(values[0])] * n if len(values) == 1 else [float(v) for v in values]  # noqa: E731
    slope, intercept = per_slice(slopes), per_slice(intercepts)
    if not enhanced and (len(set(slope)) > 1 or len(set(intercept)) > 1 or order != sorted(order)):
        raise ValueError("a legacy multi-frame file has one rescale and frames in slice order")
    row_dir, col_dir, normal = _tilted_axes()
    sop = generate_uid()
    sop_class = EnhancedCTImageStorage if enhanced else CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    _ct_header(ds, sop_class, sop, generate_uid(), generate_uid(), generate_uid(), rows, cols, photometric, 1)
    ds.NumberOfFrames = n
    orientation = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
    position = lambda k: [f"{v:.4f}" for v in np.array([-40.0, -30.0, 100.0]) + k * spacing[2] * normal]  # noqa: E731

    def item(**values) -> Dataset:
        out = Dataset()
        for key, value in values.items():
            setattr(out, key, value)
        return out

    if enhanced:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        ds.ContentQualification, ds.BurnedInAnnotation = "PRODUCT", "NO"
        ds.AcquisitionDateTime = "20260102120000"
        shared = item(PixelMeasuresSequence=DicomSequence([item(PixelSpacing=[f"{spacing[0]:g}", f"{spacing[1]:g}"],
                                                                SliceThickness=f"{spacing[2]:g}")]),
                      PlaneOrientationSequence=DicomSequence([item(ImageOrientationPatient=orientation)]))
        if window is not None:
            voi = item(WindowCenter=f"{window[0]:g}", WindowWidth=f"{window[1]:g}")
            shared.FrameVOILUTSequence = DicomSequence([voi])
        frames = []
        for k in order:
            frame = item(PlanePositionSequence=DicomSequence([item(ImagePositionPatient=position(k))]),
                         FrameContentSequence=DicomSequence([item(StackID="1", InStackPositionNumber=k + 1,
                                                                  DimensionIndexValues=[1, k + 1])]),
                         PixelValueTransformationSequence=DicomSequence([item(
                             RescaleSlope=f"{slope[k]:g}", RescaleIntercept=f"{intercept[k]:g}", RescaleType="HU")]))
            frames.append(frame)
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    else:
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{spacing[2]:g}"
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = position(0)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope[0]:g}", f"{intercept[0]:g}"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = np.stack([_stored(volume[:, :, k], slope[k], intercept[k]) for k in order]).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return sop
