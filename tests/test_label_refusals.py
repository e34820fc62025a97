"""casam-label refuses bad input and hostile clients with one JSON line and a 4xx, never a
traceback, and goes on serving (issue 22, section 6). Each refusal has its own test."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nibabel")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from casam_label.app import create_app  # noqa: E402
from casam_label.datastore import LocalDatastore  # noqa: E402
from casam_label.schemas import check_reply  # noqa: E402
from casam_label.state import ServerOptions, ServerState  # noqa: E402
from casam_label.uploads import Upload, UploadLimits, UploadTooLarge  # noqa: E402
from runtime.sessions import SessionStore, StoreOptions  # noqa: E402

KEY_A, KEY_B = "a" * 24, "b" * 24


def png_bytes(shape=(48, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def anatomical() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"


def build(pipe, tmp_path: Path, clock=None, datastore: Path | None = None, store_options: dict | None = None,
          **options) -> TestClient:
    store = SessionStore(pipe, StoreOptions(**{"cache_mb": 64, "prefetch": False, **(store_options or {})}),
                         **({"clock": clock} if clock else {}))
    state = ServerState(pipe, store, ServerOptions(work_dir=tmp_path, prefetch=0, **options),
                        None if datastore is None else LocalDatastore(datastore), ready=True)
    return TestClient(create_app(state), raise_server_exceptions=False)


@pytest.fixture
def client(pipe, tmp_path):
    with build(pipe, tmp_path, max_upload_mb=1) as c:
        yield c
        c.app.state.casam.store.shutdown()


def refused(reply, status: int, *words: str) -> str:
    """One JSON error line with ``status``; no traceback, no Python internals."""
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = check_reply("error", reply.json())
    message = body["error"]
    assert "Traceback" not in reply.text and 'File "' not in reply.text and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def post_files(client: TestClient, *files: tuple[str, bytes]):
    return client.post("/api/sessions", files=[("file", f) for f in files])


def zipped(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def still_serving(client: TestClient) -> None:
    reply = post_files(client, ("ok.png", png_bytes()))
    assert reply.status_code == 201, reply.text
    client.delete(f"/api/sessions/{reply.json()['session_id']}")


def test_a_wrong_type_is_refused(client, tmp_path):
    refused(post_files(client, ("notes.txt", b"hello, not an image")), 400, "wrong type")
    refused(post_files(client, ("scan", b"\0" * 400)), 400, "wrong type")  # no suffix, not DICOM
    refused(post_files(client, ("a.png", png_bytes()), ("b.png", png_bytes())), 400, "DICOM")
    refused(post_files(client, ("fake.png", b"this is text")), 400)
    assert list(tmp_path.glob("casam-upload-*")) == []  # refused uploads leave nothing behind
    still_serving(client)


def test_a_truncated_file_is_refused(client, anatomical):
    data = anatomical.read_bytes()
    refused(post_files(client, ("head.nii", data[: len(data) // 2])), 400, "unreadable")
    refused(post_files(client, ("pic.png", png_bytes()[:200])), 400)
    refused(post_files(client, ("series.zip", zipped({"a.dcm": b"x" * 5000})[:-60])), 400, "zip")
    still_serving(client)


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/absolute.png", "a/../../escape.png", "C:/x.png"])
def test_a_zip_with_dotdot_or_absolute_paths_is_refused(client, tmp_path, name):
    refused(post_files(client, ("series.zip", zipped({"ok.png": png_bytes(), name: png_bytes()}))), 400, "outside")
    assert not (tmp_path.parent / "escape.png").exists() and not Path("/tmp/absolute.png").exists()


def test_a_zip_with_a_symlink_or_a_bomb_is_refused(client):
    refused(post_files(client, ("s.zip", zipped({"ok.png": png_bytes()}, symlink="link.dcm"))), 400, "symbolic link")
    bomb = zipped({"zeros.dcm": b"\0" * (5 << 20)})  # 5 MB of zeros in a few kB
    assert len(bomb) < 1 << 20
    refused(post_files(client, ("bomb.zip", bomb)), 413, "unpacks")


@pytest.mark.parametrize("name", ["../up.png", "a/b.png", "..", "C:evil.png"])
def test_an_upload_named_like_a_path_is_refused(client, name):
    refused(post_files(client, (name, png_bytes())), 400, "name")


def test_an_upload_over_max_upload_mb_is_refused(client):
    big = png_bytes() + b"\0" * (2 << 20)
    refused(post_files(client, ("big.png", big)), 413, "limit")
    still_serving(client)


def test_a_body_without_content_length_is_cut_off_while_it_arrives(client):
    sent = [0]

    def chunks():
        for _ in range(64):  # 4 MB in 64 kB chunks, chunked transfer: no Content-Length to check
            sent[0] += 1
            yield b"\0" * (1 << 16)

    reply = client.post("/api/sessions", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
    refused(reply, 413, "limit")


def test_the_copy_stops_at_the_limit_not_at_the_end(tmp_path):
    class Counting(io.BytesIO):
        taken = 0

        def read(self, n=-1):
            data = super().read(n)
            self.taken += len(data)
            return data

    stream = Counting(b"\0" * (8 << 20))
    upload = Upload(UploadLimits(max_bytes=1 << 20), tmp_path)
    with pytest.raises(UploadTooLarge):
        upload.add("x.png", stream)
    assert stream.taken <= (1 << 20) + (1 << 20)  # one chunk past the limit at most, not all 8 MB
    upload.remove()


def test_a_prompt_outside_the_image_is_refused(client):
    sid = post_files(client, ("p.png", png_bytes())).json()["session_id"]
    url = f"/api/sessions/{sid}/interact"
    refused(client.post(url, json={"action": "box", "label": "a", "box": [500, 500, 600, 600]}), 400, "outside")
    refused(client.post(url, json={"action": "click", "label": "a", "point": [-40, 10]}), 400, "outside")
    refused(client.post(url, json={"action": "box", "label": "a", "slice": 3, "box": [1, 1, 9, 9]}), 400, "slice")
    refused(client.post(url, json={"action": "box", "label": "../a", "box": [1, 1, 9, 9]}), 400, "label name")
    refused(client.post(url, json={"action": "box", "label": "a", "box": [1, 1, 9]}), 400, "box")
    refused(client.post(url, json={"action": "paint", "label": "a"}), 400, "action")
    refused(client.get(f"/api/sessions/{sid}/view", params={"slice": 4}), 400)
    refused(client.get(f"/api/sessions/{sid}/result", params={"format": "exe"}), 400, "format")
    ok = client.post(url, json={"action": "box", "label": "a", "box": [5, 5, 40, 30]})
    assert ok.status_code == 200  # the session survived its refusals


def test_unknown_expired_and_foreign_sessions_read_alike(pipe, tmp_path):
    now = [0.0]
    with build(pipe, tmp_path, clock=lambda: now[0], store_options={"idle_timeout_s": 60},
               api_keys=(KEY_A, KEY_B)) as client:
        alice, bob = {"Authorization": f"Bearer {KEY_A}"}, {"X-API-Key": KEY_B}
        sid = client.post("/api/sessions", files={"file": ("p.png", png_bytes())}, headers=alice).json()["session_id"]
        assert client.get(f"/api/sessions/{sid}", headers=alice).status_code == 200
        foreign = refused(client.get(f"/api/sessions/{sid}", headers=bob), 404)
        assert refused(client.delete(f"/api/sessions/{sid}", headers=bob), 404) == foreign
        unknown = refused(client.get("/api/sessions/not-a-session", headers=alice), 404)
        now[0] = 61.0
        expired = refused(client.post(f"/api/sessions/{sid}/interact", headers=alice,
                                      json={"action": "box", "label": "a", "box": [1, 1, 9, 9]}), 404)
        assert foreign == unknown == expired
        client.app.state.casam.store.shutdown()


def test_an_expired_session_removes_its_upload(pipe, tmp_path, anatomical):
    now = [0.0]
    with build(pipe, tmp_path, clock=lambda: now[0], store_options={"idle_timeout_s": 60}) as client:
        reply = client.post("/api/sessions", files={"file": ("head.nii", anatomical.read_bytes())})
        assert reply.status_code == 201 and len(list(tmp_path.glob("casam-upload-*"))) == 1
        now[0] = 61.0
        client.app.state.casam.store.expire()
        assert list(tmp_path.glob("casam-upload-*")) == []


def test_a_datastore_id_cannot_leave_the_datastore(pipe, tmp_path, anatomical):
    store = tmp_path / "store"
    store.mkdir()
    (store / "head.nii").write_bytes(anatomical.read_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", store / "link.png")
    with build(pipe, tmp_path, datastore=store) as client:
        for bad in ["../secret.png", "/etc/passwd", "sub/../../secret.png", "link.png", ".hidden", "a\\..\\b",
                    "labels/final/x.nii.gz"]:
            refused(client.post("/api/sessions", json={"datastore_id": bad}), 400, "datastore")
        refused(client.post("/api/sessions", json={"datastore_id": "missing.nii"}), 404, "no image")
        assert [i["id"] for i in client.get("/api/datastore").json()["images"]] == ["head.nii"]  # link skipped
        assert client.post("/api/sessions", json={"datastore_id": "head.nii"}).status_code == 201
        client.app.state.casam.store.shutdown()


def test_a_datastore_label_is_never_replaced_without_intent(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.png").write_bytes(png_bytes())
    ds = LocalDatastore(store)
    first = ds.save_label("a.png", b"one", ".png")
    with pytest.raises(Exception, match="overwrite") as exc:
        ds.save_label("a.png", b"two", ".png")
    assert getattr(exc.value, "status", None) == 409 and (store / first).read_bytes() == b"one"
    ds.save_label("a.png", b"two", ".png", overwrite=True)
    assert (store / first).read_bytes() == b"two" and ds.label("a.png") == store / first


def test_over_max_sessions_is_refused(pipe, tmp_path):
    with build(pipe, tmp_path, store_options={"max_sessions": 2}) as client:
        for _ in range(2):
            assert post_files(client, ("p.png", png_bytes())).status_code == 201
        refused(post_files(client, ("p.png", png_bytes())), 429, "limit of 2 sessions")
        assert list(tmp_path.glob("casam-upload-*")) == []
        client.app.state.casam.store.shutdown()


def test_a_missing_or_wrong_api_key_is_refused_but_health_is_open(pipe, tmp_path):
    with build(pipe, tmp_path, api_keys=(KEY_A,)) as client:
        assert client.get("/health").status_code == 200
        refused(client.get("/api/info"), 401, "API key")
        refused(client.get("/api/info", headers={"Authorization": "Bearer wrong-key-wrong-key"}), 401, "API key")
        refused(post_files(client, ("p.png", png_bytes())), 401)
        assert client.get("/api/info", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        assert client.get("/ready", headers={"X-API-Key": KEY_A}).status_code == 200


def test_before_the_engines_load_the_api_answers_503(pipe, tmp_path):
    state = ServerState(None, None, ServerOptions(work_dir=tmp_path))
    with TestClient(create_app(state)) as client:
        assert client.get("/health").status_code == 200
        refused(client.get("/ready"), 503, "loading")
        refused(client.get("/api/info"), 503, "loading")


def test_a_declared_content_length_over_the_cap_is_refused_before_the_body(client):
    reply = client.post("/api/sessions", content=b"--xyz--\r\n",
                        headers={"content-type": "multipart/form-data; boundary=xyz",
                                 "content-length": str(64 << 20)})
    refused(reply, 413, "limit")
