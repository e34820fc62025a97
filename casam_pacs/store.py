"""STOW-RS: one request per stored object, so a segmentation is on the server whole or not
at all (a SEG is one instance; a partial multi-object store cannot arise).

The response is read, not just its status: a server may answer 200 or 202 and still list the
instance under FailedSOPSequence (PS3.18 10.5.3), which is a refusal here. And the answer is
not taken on trust: the stored instance is then looked up (QIDO), because a server may
acknowledge an instance that it then drops (Orthanc 1.10 answers a STOW with success when its
ReceivedInstanceFilter discards the instance), and "stored" must mean "on the server".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from casam_core.optional import optional_import
from casam_pacs.client import EXTRA, DicomWeb
from casam_pacs.errors import PacsError, PacsOptionError
from casam_pacs.query import SOP_UID, value


def store_instance(web: DicomWeb, path: Path, what: str) -> dict[str, str]:
    """STOW ``path`` (one DICOM instance) into its own study; returns its study, series and
    SOP Instance UIDs. A refusal, in the status or in the response body, is one PacsError."""
    pydicom = optional_import("pydicom", EXTRA, "--store", PacsOptionError)
    ds = pydicom.dcmread(str(path))
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    response = web.call(f"{what}: storing {path.name}", web.client.store_instances, [ds], study_instance_uid=study)
    refused = f"{what}: {web.connection.url} refused to store {path.name}"
    _check_response(response, sop, refused)
    found = web.call(f"{what}: checking that {path.name} was stored", web.client.search_for_instances,
                     study_instance_uid=study, series_instance_uid=series, search_filters={"SOPInstanceUID": sop})
    if not any(str(value(item, SOP_UID, "")) == sop for item in found):
        raise PacsError(f"{refused}: it acknowledged the STOW but does not hold the instance (dropped by a filter "
                        "or policy on the server)")
    return {"study": study, "series": series, "sop_instance": sop}


def _check_response(response: Any, sop: str, refused: str) -> None:
    """The STOW response must list ``sop`` as stored and not as failed."""
    failed = list(getattr(response, "FailedSOPSequence", None) or [])
    if failed:
        reason = getattr(failed[0], "FailureReason", None)
        raise PacsError(f"{refused} (failure reason {f'0x{int(reason):04X}' if reason is not None else 'not given'})")
    stored = [str(getattr(item, "ReferencedSOPInstanceUID", "")) for item in
              (getattr(response, "ReferencedSOPSequence", None) or [])]
    if response is not None and stored and sop not in stored:
        raise PacsError(f"{refused}: its answer lists other instances as stored")
