"""A DICOMweb server as casam-label's datastore (``--datastore https://pacs/dicom-web``).

The same four calls as the local datastore (``casam_label.datastore``), on a PACS:

- ``images()``: the server's image series (one QIDO request; SEG, SR, RT … skipped). An id is
  the SeriesInstanceUID alone, as MONAI Label's DICOMweb datastore names its images, so
  OHIF's MONAI Label extension sends the id it already has;
- ``open(id)``: the series retrieved (WADO-RS, casam_pacs) into this datastore's private
  temporary folder, under the per-series size cap, and read by the reader registry like a
  local series folder. A series is retrieved once and kept while the retrieved series fit
  the disk budget (``max_cache_bytes``, casam-label's ``--datastore-cache-mb``): past it the
  least recently opened ones are deleted (and retrieved again when next opened), so a
  long-running server's disk use is bounded whatever the PACS holds;
- ``save_label(id, data, suffix)``: a label volume (NIfTI on the series' grid, as a MONAI
  client sends it) becomes a DICOM SEG referencing the retrieved instances (casam's SEG
  writer), or a casam SEG of that series is taken as it is; either is stored with one STOW
  request and confirmed by QIDO (casam_pacs.store). A PACS keeps every SEG: a new save adds
  a newer SEG series, never replaces one;
- ``label(id, "final")``: the newest SEG that references the series (saved here, or found on
  the server), as a file.

Ids are untrusted: one that is not a DICOM UID is refused (400) before it becomes a path or
a request; one the server does not hold is 404. Only the ``final`` tag exists on a PACS.
``close()`` removes the temporary folder.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from casam_core.errors import InputError
from casam_core.files import atomic_write_bytes
from casam_core.optional import optional_import
from casam_io.readers import ReadOptions, read
from casam_io.scan import Scan
from casam_io.writers.seg import write_dicom_seg
from casam_label.datastore import MAX_ITEMS, DatastoreItem, DatastoreNotFound, LabelExists
from casam_pacs.client import EXTRA, Connection, Credentials, DicomWeb, check_uid
from casam_pacs.errors import NotFoundError, PacsOptionError
from casam_pacs.query import SeriesInfo, find_series, server_series
from casam_pacs.retrieve import DEFAULT_MAX_SERIES_BYTES, retrieve_series
from casam_pacs.store import store_instance

TAG = "final"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
REFERENCED_SERIES, SERIES_UID = "00081115", "0020000E"
VOLUME_SUFFIXES = (".nii.gz", ".nii")
#: Disk kept for retrieved series by default: a few large CT series.
DEFAULT_MAX_CACHE_BYTES = 8 * 1024 ** 3


def connect(url: str, ca_bundle: Optional[Path] = None) -> DicomWeb:
    """The checked connection for ``--datastore URL`` (credentials from the environment only);
    cheap checks first, then one request, so a wrong password is one line at startup."""
    try:
        connection = Connection(url, ca_bundle).checked()
    except PacsOptionError as exc:
        raise PacsOptionError(str(exc).replace("--dicomweb", "--datastore")) from None
    web = DicomWeb(connection, Credentials.from_env())
    web.call("--datastore: checking the DICOMweb server", web.client.search_for_studies, limit=1)
    return web


class DicomWebDatastore:
    """A DICOMweb server's image series, retrieved on demand into a private folder."""

    def __init__(self, web: DicomWeb, max_series_bytes: int = DEFAULT_MAX_SERIES_BYTES,
                 work_dir: Optional[Path] = None, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> None:
        # One series must fit the budget on its own.
        self.web, self.max_series_bytes = web, min(max_series_bytes, max_cache_bytes)
        self.max_cache_bytes = max_cache_bytes
        self._tmp = tempfile.TemporaryDirectory(prefix="casam-label-dicomweb-", dir=work_dir)
        self.folder = Path(self._tmp.name)
        self._lock = threading.Lock()
        self._series: dict[str, SeriesInfo] = {}  # every series of the last listing (SEGs too)
        # Per series: held while it is retrieved or read, so eviction never deletes it under a
        # reader (re-entrant: saving a label opens its series again).
        self._retrieving: dict[str, threading.RLock] = {}
        # Retrieved series → (its folder, its bytes), least recently opened first.
        self._retrieved: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self._labels: dict[str, Path] = {}  # id → the newest SEG file saved or retrieved here
        self._references: dict[str, Optional[str]] = {}  # SEG series → the series it references

    @property
    def url(self) -> str:
        return self.web.connection.url

    def close(self) -> None:
        """Remove every retrieved series and label (the server's shutdown calls this)."""
        self._tmp.cleanup()

    def images(self) -> list[DatastoreItem]:
        every = server_series(self.web)
        with self._lock:
            self._series.update({s.series_uid: s for s in every})
        images = [s for s in every if s.is_image][:MAX_ITEMS]
        return sorted((DatastoreItem(s.series_uid, _name(s), "series") for s in images), key=lambda i: i.id)

    def _info(self, image_id: object) -> SeriesInfo:
        """The image series ``image_id`` names: a UID (400 otherwise) the server holds (404 otherwise)."""
        uid = check_uid(image_id, "datastore id", InputError)  # type: ignore[arg-type] - checked here
        info = self._series.get(uid) or find_series(self.web, uid)
        if info is None:
            raise DatastoreNotFound(f"no series {uid} on {self.url}")
        if not info.is_image:
            raise InputError(f"series {uid} on {self.url} is a {info.modality} series, not images")
        with self._lock:
            self._series[uid] = info
        return info

    def _guard(self, uid: str) -> threading.RLock:
        with self._lock:
            return self._retrieving.setdefault(uid, threading.RLock())

    def resolve(self, image_id: str) -> Path:
        """The series' folder here, retrieved once (concurrent opens of one series wait for one
        retrieval). The folder may be evicted once this returns: ``open`` reads under the guard."""
        info = self._info(image_id)
        with self._guard(info.series_uid):
            return self._resolve(info)

    def _resolve(self, info: SeriesInfo) -> Path:
        """``resolve`` with the series' guard held by the caller."""
        uid = info.series_uid
        with self._lock:
            folder = self._retrieved[uid][0] if uid in self._retrieved else None
            if folder is not None:
                self._retrieved.move_to_end(uid)
        if folder is not None and folder.is_dir():
            return folder
        target = self.folder / "series"
        shutil.rmtree(target / uid, ignore_errors=True)  # a failed earlier try
        try:
            folder = retrieve_series(self.web, info, target, self.max_series_bytes)
        except NotFoundError as exc:
            raise DatastoreNotFound(f"series {uid} is no longer on {self.url}") from exc
        except BaseException:
            shutil.rmtree(target / uid, ignore_errors=True)
            raise
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        with self._lock:
            self._retrieved[uid] = (folder, size)
        self._evict(keep=uid)
        return folder

    def _evict(self, keep: str) -> None:
        """Delete the least recently opened series until the retrieved ones fit
        ``max_cache_bytes``; ``keep`` (just retrieved) stays, and so does a series being read
        or retrieved by another request (its guard is held): it goes on a later pass."""
        with self._lock:
            total = sum(size for _, size in self._retrieved.values())
            victims = [uid for uid in self._retrieved if uid != keep]
        for uid in victims:
            if total <= self.max_cache_bytes:
                return
            guard = self._guard(uid)
            if not guard.acquire(blocking=False):
                continue
            try:
                with self._lock:
                    folder, size = self._retrieved.pop(uid, (None, 0))
                total -= size
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
            finally:
                guard.release()

    def open(self, image_id: str, options: ReadOptions = ReadOptions()) -> Scan:
        info = self._info(image_id)
        with self._guard(info.series_uid):
            return read(self._resolve(info), options)

    def save_label(self, image_id: str, data: bytes, suffix: str, tag: str = TAG, overwrite: bool = False) -> str:
        """Store the label as a SEG of the series (one STOW); returns the SEG's series UID."""
        _check_tag(tag)
        info = self._info(image_id)
        if not overwrite and self.label(info.series_uid, tag) is not None:
            raise LabelExists(f"series {info.series_uid} has a SEG on {self.url} already; storing another needs "
                              "overwrite (the PACS keeps both)")
        with self._guard(info.series_uid), \
                tempfile.TemporaryDirectory(prefix="casam-label-seg-", dir=self.folder) as tmp:
            scan = self.open(info.series_uid)  # its files stay while the SEG is written
            upload = Path(tmp) / f"label{suffix}"
            atomic_write_bytes(upload, data)
            seg = Path(tmp) / f"{info.series_uid}_seg.dcm"
            if suffix.lower() == ".dcm":
                _check_seg(upload, info)
                seg = upload
            elif suffix.lower() in VOLUME_SUFFIXES:
                _label_seg(upload, scan, seg)
            else:
                raise InputError(f"a DICOMweb datastore stores a label sent as NIfTI (.nii.gz) or as a DICOM SEG "
                                 f"(.dcm), not {suffix!r}")
            stored = store_instance(self.web, seg, f"series {info.series_uid}")
            kept = self.folder / "labels" / f"{stored['series']}.dcm"  # checked UIDs (casam_pacs.store read them)
            kept.parent.mkdir(exist_ok=True)
            shutil.copyfile(seg, kept)
        with self._lock:
            self._labels[info.series_uid] = kept
            self._references[stored["series"]] = info.series_uid
        return stored["series"]

    def label(self, image_id: str, tag: str = TAG) -> Optional[Path]:
        """The newest SEG referencing the series: saved here, else the server's (retrieved once).
        A PACS holds no other tag: any other is None."""
        info = self._info(image_id)
        if tag != TAG:
            return None
        kept = self._labels.get(info.series_uid)
        if kept is not None:
            return kept
        segs = [s for s in list(self._series.values()) if s.modality.upper() == "SEG" and s.study_uid == info.study_uid]
        for seg in sorted(segs, key=lambda s: (s.number or 0, s.series_uid), reverse=True):
            if self._referenced(seg) == info.series_uid:
                folder = retrieve_series(self.web, seg, Path(tempfile.mkdtemp(dir=self.folder)), self.max_series_bytes)
                path = sorted(folder.glob("*.dcm"))[0]
                with self._lock:
                    self._labels[info.series_uid] = path
                return path
        return None

    def _referenced(self, seg: SeriesInfo) -> Optional[str]:
        """The series a SEG series references (its metadata, read once per SEG)."""
        if seg.series_uid not in self._references:
            meta = self.web.call(f"reading the metadata of SEG series {seg.series_uid}",
                                 self.web.client.retrieve_series_metadata, seg.study_uid, seg.series_uid)
            refs = [r.get(SERIES_UID, {}).get("Value", [None])[0] for m in meta[:1]
                    for r in m.get(REFERENCED_SERIES, {}).get("Value", [])]
            self._references[seg.series_uid] = refs[0] if refs else None
        return self._references[seg.series_uid]


def _name(series: SeriesInfo) -> str:
    what = series.description or series.modality or "series"
    return f"{what} #{series.number}" if series.number is not None else what


def _check_tag(tag: str) -> None:
    if tag != TAG:
        raise InputError(f"a DICOMweb datastore stores {TAG!r} labels only (as DICOM SEG), not {tag!r}")


def _check_seg(path: Path, info: SeriesInfo) -> None:
    """A SEG sent as it is must be a SEG of this series' study that references this series."""
    pydicom = optional_import("pydicom", EXTRA, "a DICOMweb datastore", InputError)
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable upload is one line
        raise InputError(f"the label is not a readable DICOM file ({exc})") from None
    refs = {str(getattr(r, "SeriesInstanceUID", "")) for r in getattr(ds, "ReferencedSeriesSequence", [])}
    if str(getattr(ds, "SOPClassUID", "")) != SEG_CLASS:
        raise InputError("a DICOM label must be a DICOM Segmentation (SEG)")
    if str(getattr(ds, "StudyInstanceUID", "")) != info.study_uid or info.series_uid not in refs:
        raise InputError(f"the SEG does not reference series {info.series_uid} of study {info.study_uid}")


def _label_seg(upload: Path, scan: Scan, seg: Path) -> None:
    """A label volume on the series' grid → a SEG of the series (segments named by value)."""
    labels = np.asarray(read(upload, ReadOptions(strict_4d=False)).data)
    if labels.ndim == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != scan.data.shape[:3]:
        raise InputError(f"the label's shape {list(labels.shape)} is not the series' {list(scan.data.shape[:3])}")
    if labels.size and (labels.min() < 0 or labels.max() > 255 or not np.array_equal(labels, np.round(labels))):
        raise InputError("a label volume holds whole numbers 0 to 255 (0 is background)")
    values = labels.astype(np.uint8)
    names = {int(v): f"label {int(v)}" for v in np.unique(values) if v}
    if not write_dicom_seg(seg, scan, values, names):
        raise InputError("the label is empty: nothing to store as a DICOM SEG")

