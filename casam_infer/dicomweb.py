"""casam-infer's inputs from a DICOMweb server (--dicomweb): the series of one study, each
retrieved into a temporary folder named by its series UID, then segmented by the very code
that segments a local series folder (casam_infer.jobs); with --store each volume's SEG goes
back by STOW-RS, one request per SEG, before its local outputs appear in --out.

``check_pacs`` is the cheap part (options, URL, UIDs, the credentials in the environment),
run before any request or engine load; ``pacs_inputs`` does the network part.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from casam_core.errors import InputError
from casam_infer.options import PacsOptions, VolumeOptions
from casam_pacs.client import Connection, Credentials, DicomWeb, check_uid
from casam_pacs.errors import AuthenticationError, PacsError
from casam_pacs.query import image_series
from casam_pacs.retrieve import retrieve_series
from casam_pacs.store import store_instance


@dataclass(frozen=True)
class PacsSource:
    """A checked --dicomweb request: the connection, the credentials and the options."""

    connection: Connection
    credentials: Credentials
    options: PacsOptions


def check_pacs(images: Sequence[Path], pacs: PacsOptions, vol: VolumeOptions) -> Optional[PacsSource]:
    """None without PACS options; else the checked request. Everything here is local: a typo
    in a UID or a missing password is found before any request is sent."""
    if not pacs.used:
        return None
    if pacs.dicomweb is None:
        given = [name for name, on in (("--study", pacs.study is not None), ("--series", bool(pacs.series)),
                                       ("--store", pacs.store), ("--ca-bundle", pacs.ca_bundle is not None),
                                       ("--max-series-mb", pacs.max_series_mb != PacsOptions().max_series_mb)) if on]
        raise InputError(f"{', '.join(given)} need(s) --dicomweb URL")
    if images:
        raise InputError("--dicomweb reads its series from the server: give no IMAGE arguments")
    if pacs.study is None:
        raise InputError("--dicomweb needs --study UID (the study whose series to segment)")
    if pacs.store and vol.single_slice:
        raise InputError("--store stores each volume's DICOM SEG; --single-slice writes 2-D PNG masks, no SEG")
    check_uid(pacs.study, "--study")
    for uid in pacs.series:
        check_uid(uid, "--series")
    connection = Connection(pacs.dicomweb, pacs.ca_bundle).checked()
    return PacsSource(connection, Credentials.from_env(), pacs)


@dataclass
class PacsInputs:
    """The retrieved series (one folder each), how many could not be retrieved, and the
    SEG store hook for the jobs (None without --store)."""

    folders: list[Path] = field(default_factory=list)
    series: list[str] = field(default_factory=list)  # every image series UID asked for
    failed: int = 0
    store: Optional[Callable[[Path, Path, dict[str, Any]], dict[str, Any]]] = None


@contextmanager
def pacs_inputs(source: PacsSource, report: Callable[[str], None]) -> Iterator[PacsInputs]:
    """Find the study's image series (QIDO) and retrieve each (WADO-RS) into a temporary
    folder that is removed afterwards. A series that fails is reported with its UID and
    counted; an authentication failure, or a study that cannot be listed, ends the run."""
    pacs = source.options
    web = DicomWeb(source.connection, source.credentials)
    series = image_series(web, str(pacs.study), pacs.series)
    inputs = PacsInputs(series=[s.series_uid for s in series],
                        store=SegStore(web) if pacs.store else None)
    with tempfile.TemporaryDirectory(prefix="casam-dicomweb-") as tmp:
        for info in series:
            try:
                inputs.folders.append(retrieve_series(web, info, Path(tmp), pacs.max_series_mb * 1024 ** 2))
            except AuthenticationError:
                raise
            except PacsError as exc:
                inputs.failed += 1
                text = str(exc)
                report(text if info.series_uid in text else f"series {info.series_uid}: {text}")
        yield inputs


@dataclass
class SegStore:
    """--store: a volume's SEG, STOWed while its outputs are still staged (a refusal fails
    that series, and its local outputs do not appear either)."""

    web: DicomWeb

    def __call__(self, series_folder: Path, staging: Path, record: dict[str, Any]) -> dict[str, Any]:
        name = record["outputs"].get("seg")
        if name is None:
            why = "; ".join(record["warnings"]) or "nothing was segmented"
            raise PacsError(f"series {series_folder.name}: no DICOM SEG to store ({why})")
        what = f"series {series_folder.name}"
        stored: dict[str, Any] = {"url": self.web.connection.url, **store_instance(self.web, staging / name, what)}
        if record["outputs"].get("rtstruct"):  # its own request: each object is stored whole or not at all
            stored["rtstruct"] = store_instance(self.web, staging / record["outputs"]["rtstruct"], what)
        return stored
