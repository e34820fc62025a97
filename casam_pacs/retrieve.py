"""WADO-RS: one series into a folder, one instance at a time.

Memory holds one instance at a time (never the whole series), and the folder is refused once
the series' files pass ``max_bytes``. Every retrieved instance is checked to be the one asked
for (a server that answers with another object must not end up segmented under this
series' name). The folder is then an ordinary DICOM series folder: casam reads it through
the same reader as a local one (casam_io.readers), so a PACS series and a folder behave alike.
"""

from __future__ import annotations

from pathlib import Path

from casam_core.faults import fault_point
from casam_pacs.client import DicomWeb
from casam_pacs.errors import PacsError
from casam_pacs.query import SeriesInfo, series_instances

DEFAULT_MAX_SERIES_BYTES = 2 * 1024 ** 3  # 2 GiB: a large CT series is a few hundred MB


def retrieve_series(web: DicomWeb, series: SeriesInfo, folder: Path, max_bytes: int = DEFAULT_MAX_SERIES_BYTES) -> Path:
    """Every instance of ``series`` as ``folder/<series UID>/<SOP instance UID>.dcm``; returns that folder.

    The folder is named by the series UID so that outputs, error lines and a --prompts file
    all name the series by its UID."""
    uids = series_instances(web, series)
    target = folder / series.series_uid
    target.mkdir(parents=True)
    total = 0
    for n, sop in enumerate(uids):
        what = f"series {series.series_uid}: retrieving instance {n + 1} of {len(uids)} ({sop})"
        ds = web.call(what, web.client.retrieve_instance, series.study_uid, series.series_uid, sop)
        got = (str(getattr(ds, "SOPInstanceUID", "")), str(getattr(ds, "SeriesInstanceUID", "")))
        if got != (sop, series.series_uid):
            raise PacsError(f"{what}: the server answered with instance {got[0] or '?'} of series {got[1] or '?'}")
        path = target / f"{sop}.dcm"  # a checked UID (casam_pacs.query): a safe file name
        ds.save_as(str(path))
        total += path.stat().st_size
        if total > max_bytes:
            raise PacsError(f"series {series.series_uid} is larger than the {max_bytes / 1024 ** 2:.0f} MB limit "
                            f"(--max-series-mb) after {n + 1} of {len(uids)} instances")
        fault_point("pacs:after-instance")
    return target
