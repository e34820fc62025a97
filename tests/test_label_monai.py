"""MONAI Label's API on casam-label, driven by MONAI Label's OWN client (``monailabel.client.
MONAILabelClient``, installed with --no-deps) against a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import need
from casam_io.readers import read
from casam_core.local_server import free_port
from runtime.sessions import SessionSource, SessionStore, StoreOptions


@pytest.fixture(scope="module")
def anatomical_path() -> Path:
    need("nibabel")
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"  # a real 33×41×25 int16 MR volume


@contextlib.contextmanager
def serving(pipe, work: Path, options: Any = None) -> Iterator[tuple[str, Any]]:
    """casam-label's app (create_app) under uvicorn on a free localhost port, in a thread."""
    need("fastapi", "interactive")
    uvicorn = need("uvicorn", "interactive")
    from casam_label.app import create_app
    from casam_label.state import ServerOptions, ServerState

    store = SessionStore(pipe, StoreOptions(cache_mb=64, prefetch=False))
    state = ServerState(pipe, store, options or ServerOptions(work_dir=work), ready=True)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "casam-label did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        srv.should_exit = True
        thread.join(10)
        store.shutdown()


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    with serving(pipe, tmp_path_factory.mktemp("work")) as running:
        yield running


def client(url: str, tmp_path: Path):
    need("monailabel", "interactive")
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(url, tmpdir=str(tmp_path))


def native_mask(pipe, path: Path, steps) -> np.ndarray:
    """The same prompts on a native session (no server): the reference for the API's mask."""
    store = SessionStore(pipe, StoreOptions(cache_mb=64, prefetch=False))
    session = store.create(SessionSource.open(read(path), pipe.preprocessing, 2))
    result = None
    for kind, args in steps:
        result = getattr(session, kind)("organ", *args)
    store.shutdown()
    return result.mask


def test_info_offers_one_click_model(server, tmp_path):
    url, _ = server
    info = client(url, tmp_path).info()
    model = info["models"]["casam"]
    assert model["type"] in ("deepgrow", "deepedit")  # Slicer's click tools (foreground/background points)
    assert model["dimension"] == 3 and info["labels"] == list(model["labels"])
    assert set(info["casam"]["tasks"]) and not info["trainers"] and not info["strategies"]


def test_session_clicks_and_roi_end_to_end(server, anatomical_path, pipe, tmp_path):
    nib = need("nibabel")
    url, _ = server
    c = client(url, tmp_path)
    created = c.create_session(str(anatomical_path), {"expiry": 600})
    sid = created["session_id"]
    assert c.get_session(sid)["name"] == sid
    # A click at voxel (i, j, k) = (16, 25, 12): Slicer's IJK, nibabel's data[i, j, k].
    out, params = c.infer("casam", "anatomical", {"label": "organ", "foreground": [[16, 25, 12]], "background": [],
                                                 "result_extension": ".nii.gz", "result_dtype": "uint8"},
                          session_id=sid)
    assert params["label_names"] == {"organ": 1} and params["route"]["task"] and params["interactions"] == 1
    src, lab = nib.load(str(anatomical_path)), nib.load(out)
    assert lab.shape == src.shape and np.array_equal(lab.affine, src.affine)  # the source's geometry
    assert int(lab.header["qform_code"]) == int(src.header["qform_code"])
    got = np.asarray(lab.dataobj)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
    want = native_mask(pipe, anatomical_path, [("click", (25.0, 16.0, True, 12))])  # x = j, y = i on slice k
    assert np.array_equal(got[:, :, 12].astype(bool), want)
    # The viewer resends every click so far plus a new one: one more decoder run, same as a native session.
    out, params = c.infer("casam", "anatomical", {"label": "organ", "foreground": [[16, 25, 12]],
                                                 "background": [[5, 5, 12]]}, session_id=sid)
    assert params["interactions"] == 1
    want = native_mask(pipe, anatomical_path, [("click", (25.0, 16.0, True, 12)), ("click", (5.0, 5.0, False, 12))])
    assert np.array_equal(np.asarray(nib.load(out).dataobj)[:, :, 12].astype(bool), want)
    # A flat ROI [i0, i1, j0, j1, k0, k1] is a box on its slice: x from j, y from i.
    out, params = c.infer("casam", "anatomical", {"label": "box", "roi": [8, 24, 10, 30, 7, 7]}, session_id=sid)
    want = native_mask(pipe, anatomical_path, [("box", ([10, 8, 30, 24], 7))])
    assert np.array_equal(np.asarray(nib.load(out).dataobj)[:, :, 7].astype(bool), want)
    c.remove_session(sid)
    with pytest.raises(Exception, match="404"):
        c.get_session(sid)


def test_a_3d_roi_propagates_within_its_range(server, anatomical_path, tmp_path):
    nib = need("nibabel")
    url, _ = server
    c = client(url, tmp_path)
    sid = c.create_session(str(anatomical_path))["session_id"]
    out, params = c.infer("casam", "x", {"label": "organ", "roi": [6, 26, 8, 32, 9, 15]}, session_id=sid)
    got = np.asarray(nib.load(out).dataobj)
    touched = set(np.flatnonzero(got.any(axis=(0, 1))))
    assert 12 in params["slices"] and touched <= set(range(9, 16))  # never beyond the ROI's slices
    c.remove_session(sid)


def test_errors_are_one_json_line(server, anatomical_path, tmp_path):
    import requests

    url, _ = server
    sid = client(url, tmp_path).create_session(str(anatomical_path))["session_id"]
    cases = [({"foreground": [[16, 25, 99]]}, 400, "slice 99"),  # a slice outside the volume
             ({"roi": [1, 2, 3]}, 400, "roi"), ({"label": "../x"}, 400, "label name")]
    for params, status, words in cases:
        r = requests.post(f"{url}/infer/casam?session_id={sid}", files={"params": (None, __import__("json").dumps(params))})
        assert r.status_code == status and words in r.json()["error"], (params, r.text)
    r = requests.post(f"{url}/infer/casam?session_id=nope", files={"params": (None, "{}")})
    assert r.status_code == 404 and "no such session" in r.json()["error"]
    r = requests.post(f"{url}/infer/other?session_id={sid}", files={"params": (None, "{}")})
    assert r.status_code == 404 and "casam" in r.json()["error"]
    half = anatomical_path.read_bytes()[:30000]  # a truncated NIfTI: refused by casam_label.uploads, named as sent
    for r in (requests.put(f"{url}/session/", files={"files": ("cut head.nii", half)}),
              requests.post(f"{url}/infer/casam", files={"params": (None, "{}"), "file": ("cut head.nii", half)})):
        assert r.status_code == 400 and "cut head.nii" in r.json()["error"], r.text
        assert "/tmp" not in r.text and "casam-upload-" not in r.text, r.text


def test_datastore_upload_infer_and_save_label(server, anatomical_path, tmp_path):
    nib = need("nibabel")
    from casam_label.datastore import LocalDatastore

    url, state = server
    root = tmp_path / "store"
    root.mkdir()
    state.datastore = LocalDatastore(root)
    try:
        c = client(url, tmp_path)
        assert c.upload_image(str(anatomical_path), "anatomical") == {"image": "anatomical.nii"}
        assert "anatomical.nii" in c.datastore()["objects"]
        # image=ID without a session: one is opened on the datastore image and kept.
        out, params = c.infer("casam", "anatomical", {"label": "organ", "foreground": [[16, 25, 12]]})
        assert params["slices"] == [12] and params["route"]["task"]
        saved = c.save_label("anatomical", out, tag="final")
        assert saved["label"].startswith("labels/final/")
        stored = nib.load(str(root / saved["label"]))
        assert np.array_equal(np.asarray(stored.dataobj), np.asarray(nib.load(out).dataobj))
        objects = c.datastore()["objects"]
        assert "final" in objects["anatomical.nii"]["labels"]
        back = c.download_label("anatomical", "final")
        assert Path(back).read_bytes() == (root / saved["label"]).read_bytes()
        with pytest.raises(Exception, match="400"):
            c.save_label("../etc/passwd", out)
    finally:
        state.datastore = None


def test_a_session_expires_after_the_expiry_it_asked_for_capped_by_the_server(server, anatomical_path, tmp_path):
    url, state = server
    c = client(url, tmp_path)
    idle = int(state.store.options.idle_timeout_s)
    long = c.create_session(str(anatomical_path), {"expiry": idle * 10})
    assert c.get_session(long["session_id"])["expiry"] == idle  # never longer than the server's idle timeout
    short = c.create_session(str(anatomical_path), {"expiry": 1})
    assert c.get_session(short["session_id"])["expiry"] == 1
    time.sleep(1.5)  # past its expiry: the next request finds it gone
    with pytest.raises(Exception, match="404"):
        c.get_session(short["session_id"])
    assert c.get_session(long["session_id"])["expiry"] == idle  # the other one lives on
    c.remove_session(long["session_id"])


def test_monai_clients_log_in_with_the_api_key(pipe, anatomical_path, tmp_path):
    """MONAI Label's login as its client does it: /auth/ says login is needed, /auth/token
    takes the API key as the password, and the token then opens sessions."""
    from casam_label.state import ServerOptions

    key = "m" * 32
    with serving(pipe, tmp_path, ServerOptions(work_dir=tmp_path, api_keys=(key,))) as (url, _):
        c = client(url, tmp_path)
        assert c.auth_enabled() and not c.auth_valid_token()
        with pytest.raises(Exception, match="401"):
            c.info()
        with pytest.raises(Exception, match="401"):
            c.auth_token("annotator", "not-the-key")
        c.update_auth(c.auth_token("annotator", key))
        assert c.auth_valid_token()
        sid = c.create_session(str(anatomical_path))["session_id"]
        assert c.get_session(sid)["name"] == sid
        other = client(url, tmp_path)  # another client with another key could not see it; without one, 401
        with pytest.raises(Exception, match="401"):
            other.get_session(sid)
        c.remove_session(sid)
