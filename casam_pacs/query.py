"""QIDO-RS: what a server holds, as plain values (no DICOM JSON past this module).

A study's image series are the ones casam can segment; derived objects stored beside them
(SEG, SR, PR, RT objects, key images) are skipped, so a study that already holds casam's own
SEGs is segmented again from its images, not from its SEGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from casam_pacs.client import DicomWeb, check_uid
from casam_pacs.errors import NotFoundError, PacsError

#: Modalities of series that hold no images to segment (PS3.3 C.7.3.1.1.1 defined terms).
NON_IMAGE_MODALITIES = frozenset({
    "SEG", "SR", "PR", "KO", "DOC", "REG", "FID", "RWV", "PLAN", "RESP",
    "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "AU", "ECG", "HD", "EPS",
})
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, SERIES_DESCRIPTION, SERIES_NUMBER, INSTANCE_NUMBER = "00080060", "0008103E", "00200011", "00200013"
STUDY_DESCRIPTION, PATIENT_ID = "00081030", "00100020"


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study, as QIDO describes it."""

    study_uid: str
    series_uid: str
    modality: str
    description: str = ""
    number: Optional[int] = None

    @property
    def is_image(self) -> bool:
        return self.modality.upper() not in NON_IMAGE_MODALITIES


def value(attributes: dict[str, Any], tag: str, default: Any = None) -> Any:
    """The first value of ``tag`` in one DICOM JSON object (PS3.18 F.2), or ``default``."""
    values = attributes.get(tag, {}).get("Value") or []
    return values[0] if values else default


def list_studies(web: DicomWeb, limit: Optional[int] = None) -> list[dict[str, str]]:
    """The server's studies: UID, description and patient ID (for a datastore's listing)."""
    found = web.call("listing studies", web.client.search_for_studies, limit=limit, get_remaining=limit is None,
                     fields=[STUDY_DESCRIPTION, PATIENT_ID])
    return [{"study": value(s, STUDY_UID, ""), "description": value(s, STUDY_DESCRIPTION, ""),
             "patient_id": value(s, PATIENT_ID, "")} for s in found]


def study_series(web: DicomWeb, study: str) -> list[SeriesInfo]:
    """Every series of ``study``; NotFoundError when the server holds no such study (servers
    answer an unknown study with 404 or with an empty list: both mean the same here)."""
    what = f"study {study}"
    try:
        found = web.call(f"listing the series of {what}", web.client.search_for_series, study_instance_uid=study,
                         get_remaining=True, fields=[MODALITY, SERIES_DESCRIPTION, SERIES_NUMBER])
    except NotFoundError as exc:
        raise NotFoundError(f"{what} is not on {web.connection.url}") from exc
    if not found:
        raise NotFoundError(f"{what} is not on {web.connection.url}")
    every = [SeriesInfo(study, check_uid(value(s, SERIES_UID, ""), f"{web.connection.url} listed a series UID", PacsError),
                        str(value(s, MODALITY, "")),
                        str(value(s, SERIES_DESCRIPTION, "")), value(s, SERIES_NUMBER)) for s in found]
    # One UID once: Orthanc, for one, lists a series once per patient its instances name.
    return list({s.series_uid: s for s in reversed(every)}.values())[::-1]


def image_series(web: DicomWeb, study: str, wanted: Sequence[str] = ()) -> list[SeriesInfo]:
    """The series of ``study`` to segment: ``wanted`` ones (each must be an image series of
    the study), or else every image series, in series-number order."""
    every = study_series(web, study)
    if wanted:
        by_uid = {s.series_uid: s for s in every}
        for uid in wanted:
            if uid not in by_uid:
                raise NotFoundError(f"series {uid} is not in study {study} on {web.connection.url}")
            if not by_uid[uid].is_image:
                raise PacsError(f"series {uid} of study {study} is a {by_uid[uid].modality} series, not images")
        return [by_uid[uid] for uid in dict.fromkeys(wanted)]
    images = [s for s in every if s.is_image]
    if not images:
        kinds = ", ".join(sorted({s.modality for s in every}))
        raise PacsError(f"study {study} on {web.connection.url} holds no image series (only {kinds})")
    return sorted(images, key=lambda s: (s.number is None, s.number or 0, s.series_uid))


def series_instances(web: DicomWeb, series: SeriesInfo) -> list[str]:
    """The SOP Instance UIDs of ``series``, in instance-number order."""
    found = web.call(f"listing the instances of series {series.series_uid}", web.client.search_for_instances,
                     study_instance_uid=series.study_uid, series_instance_uid=series.series_uid, get_remaining=True,
                     fields=[INSTANCE_NUMBER])
    if not found:
        raise NotFoundError(f"series {series.series_uid} has no instances on {web.connection.url}")
    ordered = sorted(found, key=lambda i: (value(i, INSTANCE_NUMBER) is None, value(i, INSTANCE_NUMBER) or 0,
                                           value(i, SOP_UID, "")))
    what = f"{web.connection.url} listed an instance UID of series {series.series_uid}"
    return list(dict.fromkeys(check_uid(value(i, SOP_UID, ""), what, PacsError) for i in ordered))  # each once


def server_series(web: DicomWeb, limit: Optional[int] = None) -> list[SeriesInfo]:
    """Every series on the server (one QIDO request across studies), for a datastore's listing;
    a UID the server sends that is not a UID is refused (it becomes a folder name)."""
    found = web.call("listing the server's series", web.client.search_for_series, limit=limit,
                     get_remaining=limit is None, fields=[STUDY_UID, MODALITY, SERIES_DESCRIPTION, SERIES_NUMBER])
    url = web.connection.url
    every = [SeriesInfo(check_uid(value(s, STUDY_UID, ""), f"{url} listed a study UID", PacsError),
                        check_uid(value(s, SERIES_UID, ""), f"{url} listed a series UID", PacsError),
                        str(value(s, MODALITY, "")), str(value(s, SERIES_DESCRIPTION, "")), value(s, SERIES_NUMBER))
             for s in found]
    return list({s.series_uid: s for s in reversed(every)}.values())[::-1]  # each once (see study_series)


def find_series(web: DicomWeb, series: str) -> Optional[SeriesInfo]:
    """The series with this UID wherever it is on the server, or None (a datastore id names a
    series without its study)."""
    try:
        found = web.call(f"looking up series {series}", web.client.search_for_series,
                         search_filters={"SeriesInstanceUID": series},
                         fields=[STUDY_UID, MODALITY, SERIES_DESCRIPTION, SERIES_NUMBER])
    except NotFoundError:
        return None
    url = web.connection.url
    for s in found:
        if value(s, SERIES_UID, "") == series:
            return SeriesInfo(check_uid(value(s, STUDY_UID, ""), f"{url} listed a study UID", PacsError), series,
                              str(value(s, MODALITY, "")), str(value(s, SERIES_DESCRIPTION, "")),
                              value(s, SERIES_NUMBER))
    return None
