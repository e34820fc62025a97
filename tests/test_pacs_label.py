"""casam-label with a DICOMweb datastore on the session's real Orthanc (tests/orthanc_support.py):
the server's image series are listed by SeriesInstanceUID (its SEGs are not), a session opens
on nibabel's MR series by that id, a box is drawn, and ``POST /api/sessions/{id}/store`` puts a
SEG in Orthanc that passes dciodvfy and references the retrieved instances; MONAI Label's
``/datastore/`` lists the series and ``PUT /datastore/label`` stores a SEG from a NIfTI label.
Refusals: an id that is not a UID (400), a UID Orthanc does not hold (404), a wrong password
(one line naming authentication, at startup, before the engines load).

The series used here is a copy of nibabel's two-slice series under new UIDs, uploaded by this
module: the SEGs stored here then never meet the study test_pacs_orthanc.py checks.
"""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

from casam_core.local_server import free_port
from conftest import assert_valid_dicom, need
from orthanc_support import PASSWORD, SEG_CLASS, USER, Orthanc, nicom
from runtime_support import one_error_line

pytest_plugins = ["orthanc_support"]  # the session's one Orthanc (fixtures orthanc, credentials)
BOX = [10, 10, 60, 60]  # on slice 0 of nibabel's 256×256 series


def upload_copy(orthanc: Orthanc, folder: Path) -> dict[str, Any]:
    """nibabel's series under a new study, series and SOP Instance UIDs, uploaded to Orthanc."""
    pydicom = need("pydicom")
    study, uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    sops = []
    for name in ("0.dcm", "1.dcm"):
        ds = pydicom.dcmread(str(nicom() / name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, uid, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(str(folder / name))
        orthanc.upload(folder / name)
        sops.append(str(ds.SOPInstanceUID))
    return {"study": study, "series": uid, "sops": set(sops)}


@pytest.fixture(scope="module")
def series(orthanc: Orthanc, tmp_path_factory) -> dict[str, Any]:
    return upload_copy(orthanc, tmp_path_factory.mktemp("nicom-copy"))


@pytest.fixture()
def client(orthanc, credentials, pipe, tmp_path) -> Iterator[Any]:
    need("fastapi", "interactive")
    from fastapi.testclient import TestClient

    from casam_label.app import create_app
    from casam_label.cli import open_datastore
    from casam_label.state import ServerOptions, ServerState
    from runtime.sessions import SessionStore, StoreOptions

    datastore = open_datastore(orthanc.dicomweb)
    store = SessionStore(pipe, StoreOptions(cache_mb=128, prefetch=False))
    state = ServerState(pipe, store, ServerOptions(work_dir=tmp_path, prefetch=0), datastore, ready=True)
    try:
        with TestClient(create_app(state)) as c:
            yield c
    finally:
        store.shutdown()
        datastore.close()
    assert not datastore.folder.exists()  # every retrieved series and label is removed


def seg_series(orthanc: Orthanc, study: str) -> list[str]:
    return [s["uid"] for s in orthanc.series(study) if s["modality"] == "SEG"]


def fetch_seg(orthanc: Orthanc, study: str, uid: str, path: Path) -> Any:
    web = need("dicomweb_client").DICOMwebClient(orthanc.dicomweb)
    web._session.auth = (USER, PASSWORD)
    [ds] = web.retrieve_series(study, uid)
    ds.save_as(str(path))
    return ds


def open_series(client: Any, uid: str) -> str:
    reply = client.post("/api/sessions", json={"datastore_id": uid, "axis": 2})
    assert reply.status_code == 201, reply.text
    return reply.json()["session_id"]


def test_list_open_box_and_store_a_seg_in_orthanc(client, orthanc, series, tmp_path):
    hd = need("highdicom")
    listed = client.get("/api/datastore").json()["images"]
    [item] = [i for i in listed if i["id"] == series["series"]]
    assert item["kind"] == "series" and all(i["kind"] == "series" for i in listed)
    sid = open_series(client, series["series"])
    boxed = client.post(f"/api/sessions/{sid}/interact", json={"action": "box", "label": "organ", "box": BOX,
                                                              "slice": 0})
    assert boxed.status_code == 200, boxed.text
    assert seg_series(orthanc, series["study"]) == []

    stored = client.post(f"/api/sessions/{sid}/store")
    assert stored.status_code == 200, stored.text
    assert seg_series(orthanc, series["study"]) == [stored.json()["label"]]
    ds = fetch_seg(orthanc, series["study"], stored.json()["label"], tmp_path / "seg.dcm")
    assert ds.SOPClassUID == SEG_CLASS and ds.StudyInstanceUID == series["study"]
    assert_valid_dicom(tmp_path / "seg.dcm")
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert {uid for _, _, uid in seg.get_source_image_uids()} == series["sops"]
    assert [d.segment_label for d in seg.SegmentSequence] == ["organ"]
    # Its labels equal the session's download, bit for bit (the same writer, the same labels).
    download = client.get(f"/api/sessions/{sid}/result", params={"format": "seg"})
    (tmp_path / "download.dcm").write_bytes(download.content)
    np.testing.assert_array_equal(seg.pixel_array, hd.seg.segread(str(tmp_path / "download.dcm")).pixel_array)
    assert np.asarray(seg.pixel_array).any()

    # The SEG is not an image: it is not listed, and a second store needs overwrite.
    assert stored.json()["label"] not in {i["id"] for i in client.get("/api/datastore").json()["images"]}
    again = client.post(f"/api/sessions/{sid}/store")
    assert again.status_code == 409 and "overwrite" in again.json()["error"]
    assert len(seg_series(orthanc, series["study"])) == 1


def test_monai_datastore_lists_the_series_and_put_label_stores_a_seg(client, orthanc, series, tmp_path):
    nib = need("nibabel")
    reply = client.get("/datastore/", params={"output": "all"})
    assert reply.status_code == 200, reply.text
    objects = reply.json()["objects"]
    assert series["series"] in objects and objects[series["series"]]["image"]["info"]["kind"] == "series"
    scan = client.app.state.casam.datastore.open(series["series"])
    labels = np.zeros(scan.data.shape, np.uint8)
    labels[20:40, 30:50, 1] = 1
    nifti = nib.Nifti1Image(labels, scan.affine)
    before = set(seg_series(orthanc, series["study"]))
    put = client.put("/datastore/label", params={"image": series["series"], "tag": "final"},
                     files={"label": ("label.nii.gz", gzip.compress(nifti.to_bytes()))}, data={"params": "{}"})
    assert put.status_code == 200, put.text
    [new] = set(seg_series(orthanc, series["study"])) - before
    assert put.json()["label"] == new
    fetch_seg(orthanc, series["study"], new, tmp_path / "seg.dcm")
    assert_valid_dicom(tmp_path / "seg.dcm")
    seg = need("highdicom").seg.segread(str(tmp_path / "seg.dcm"))
    assert {uid for _, _, uid in seg.get_source_image_uids()} == series["sops"]
    assert int(np.asarray(seg.pixel_array).sum()) == int(labels.sum())
    listed = client.get("/datastore/", params={"output": "all"}).json()["objects"][series["series"]]
    assert "final" in listed["labels"]
    wrong = client.put("/datastore/label", params={"image": series["series"], "tag": "final"},
                       files={"label": ("label.nii.gz", gzip.compress(nib.Nifti1Image(labels[:, :, 1:],
                                                                                      scan.affine).to_bytes()))})
    assert wrong.status_code == 400 and "shape" in wrong.json()["error"]


@pytest.mark.parametrize("image_id, status, words", [
    ("../../etc/passwd", 400, "is not a DICOM UID"),
    ("1.2.3.4.5.6.7.8.9", 404, "no series 1.2.3.4.5.6.7.8.9"),
])
def test_an_id_that_is_not_a_uid_or_not_on_the_server_is_one_line(client, image_id, status, words):
    reply = client.post("/api/sessions", json={"datastore_id": image_id})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error and "\n" not in error


def test_a_seg_series_is_not_opened_as_images(client, orthanc, series):
    sid = open_series(client, series["series"])
    assert client.post(f"/api/sessions/{sid}/interact", json={"action": "box", "label": "x", "box": BOX,
                                                              "slice": 0}).status_code == 200
    stored = client.post(f"/api/sessions/{sid}/store", params={"overwrite": "true"})
    assert stored.status_code == 200, stored.text
    reply = client.post("/api/sessions", json={"datastore_id": stored.json()["label"]})
    assert reply.status_code == 400 and "is a SEG series, not images" in reply.json()["error"]


def label_cli(*args: Any) -> Any:
    from casam_label.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_wrong_password_is_one_line_at_startup(orthanc, engines, monkeypatch):
    monkeypatch.setenv("CASAM_DICOMWEB_USER", USER)
    monkeypatch.setenv("CASAM_DICOMWEB_PASSWORD", "wrong-password")
    monkeypatch.delenv("CASAM_DICOMWEB_TOKEN", raising=False)
    line = one_error_line(label_cli("--engines", engines, "--datastore", orthanc.dicomweb, "--port", free_port()))
    assert line.startswith("casam-label: error: --datastore: checking the DICOMweb server: "
                           "authentication failed") and "HTTP 401" in line and "wrong-password" not in line, line


def test_cheap_datastore_checks_come_first(engines, monkeypatch, tmp_path):
    monkeypatch.setenv("CASAM_DICOMWEB_USER", USER)
    monkeypatch.delenv("CASAM_DICOMWEB_PASSWORD", raising=False)
    monkeypatch.delenv("CASAM_DICOMWEB_TOKEN", raising=False)
    port = free_port()
    half = one_error_line(label_cli("--engines", engines, "--datastore", "http://127.0.0.1:9/dicom-web", "--port", port))
    assert "CASAM_DICOMWEB_USER is set but CASAM_DICOMWEB_PASSWORD is not" in half
    creds = one_error_line(label_cli("--engines", engines, "--datastore", "http://u:p@127.0.0.1:9/x", "--port", port))
    assert "--datastore must not hold credentials" in creds
    ca = one_error_line(label_cli("--engines", engines, "--datastore", tmp_path, "--ca-bundle", __file__,
                                  "--port", port))
    assert "--ca-bundle" in ca and "needs --datastore https://" in ca


def test_store_needs_a_session_opened_from_the_datastore(client, pipe):
    from nibabel.testing import data_path

    path = Path(data_path) / "anatomical.nii"
    sid = client.post("/api/sessions", files={"file": (path.name, path.read_bytes())}).json()["session_id"]
    reply = client.post(f"/api/sessions/{sid}/store")
    assert reply.status_code == 400 and "not opened from the datastore" in json.dumps(reply.json())


def test_retrieved_series_keep_to_the_disk_budget(orthanc, credentials, series, tmp_path):
    """Past --datastore-cache-mb the least recently opened series is deleted, and retrieved
    again when opened; a series another request is reading stays."""
    from casam_label.dicomweb_datastore import DicomWebDatastore, connect

    other = upload_copy(orthanc, tmp_path)
    a, b = series["series"], other["series"]
    probe = DicomWebDatastore(connect(orthanc.dicomweb))
    try:
        size = sum(f.stat().st_size for f in probe.resolve(a).rglob("*") if f.is_file())
    finally:
        probe.close()
    datastore = DicomWebDatastore(connect(orthanc.dicomweb), max_cache_bytes=size * 3 // 2)  # one series fits
    retrieved = lambda: sorted(p.name for p in (datastore.folder / "series").iterdir())  # noqa: E731
    try:
        first = datastore.open(a).data.copy()
        datastore.open(b)
        assert retrieved() == [b]  # a, least recently opened, made room
        assert np.array_equal(datastore.open(a).data, first) and retrieved() == [a]  # retrieved again
        reading, done = threading.Event(), threading.Event()

        def another_request_reads_a() -> None:
            with datastore._guard(a):
                reading.set()
                done.wait(60)

        reader = threading.Thread(target=another_request_reads_a)
        reader.start()
        try:
            assert reading.wait(60)
            datastore.open(b)
            assert retrieved() == sorted([a, b])  # a is in use: it stays, over the budget for now
        finally:
            done.set()
            reader.join(60)
    finally:
        datastore.close()
