"""casam-label's native JSON API (docs/INTERACTIVE.md) through FastAPI's TestClient: a real
NIfTI and a PNG opened from uploads, a box equal to casam-infer's, clicks, undo, NDJSON
propagation, downloads equal to casam-infer's files, views, the datastore, and the
mask wire format."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_label.mask_wire import decode, encode, runs, unruns
from casam_label.schemas import check_reply

nib = pytest.importorskip("nibabel")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from casam_infer.cli import main as casam_infer  # noqa: E402
from casam_label.app import create_app  # noqa: E402
from casam_label.datastore import LocalDatastore  # noqa: E402
from casam_label.state import ServerOptions, ServerState  # noqa: E402
from runtime.sessions import SessionStore, StoreOptions  # noqa: E402

BOX = [6, 6, 26, 34]  # on slice 12 of anatomical.nii (33×41 slices along axis 2)
PNG_BOX = [40, 20, 120, 100]


@pytest.fixture(scope="module")
def anatomical() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"  # a real 33×41×25 int16 MR volume


def picture(path: Path) -> Path:
    yy, xx = np.mgrid[0:120, 0:160]
    disc = ((xx - 80) ** 2 + (yy - 60) ** 2 < 30 ** 2)
    Image.fromarray(np.stack([disc * 200 + 20, xx, yy], axis=-1).astype(np.uint8)).save(path)
    return path


def make_client(pipe, tmp_path: Path, datastore: Path | None = None, **options) -> TestClient:
    store = SessionStore(pipe, StoreOptions(cache_mb=128, prefetch=False))
    state = ServerState(pipe, store, ServerOptions(work_dir=tmp_path, prefetch=0, **options),
                        None if datastore is None else LocalDatastore(datastore), ready=True)
    return TestClient(create_app(state))


@pytest.fixture
def client(pipe, tmp_path):
    with make_client(pipe, tmp_path) as c:
        yield c
        c.app.state.casam.store.shutdown()


def infer(*args) -> None:
    result = CliRunner().invoke(casam_infer, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def upload(client: TestClient, path: Path, **form) -> dict:
    reply = client.post("/api/sessions", files={"file": (path.name, path.read_bytes())}, data=form)
    assert reply.status_code == 201, reply.text
    return check_reply("session", reply.json())


def interact(client: TestClient, sid: str, **body) -> dict:
    reply = client.post(f"/api/sessions/{sid}/interact", json=body)
    assert reply.status_code == 200, reply.text
    return check_reply("interaction", reply.json())


def uploads_left(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("casam-upload-*"))


def test_a_box_on_slice_12_equals_the_session_and_casam_infer(client, pipe, anatomical, engines, tmp_path):
    described = upload(client, anatomical, task="alpha")
    sid = described["session_id"]
    assert described["shape"] == [33, 41, 25] and described["slices"] == 25 and described["route"] is None
    reply = interact(client, sid, action="box", label="organ", slice=12, box=BOX)
    mask = decode(reply["masks"][0])
    assert reply["masks"][0]["slice"] == 12 and mask.shape == (33, 41) and mask.any()
    assert reply["route"]["task"] == "alpha" and reply["route"]["mode"] == "forced"
    assert reply["timings_ms"]["server"] >= reply["timings_ms"]["decoder"] > 0
    session = client.app.state.casam.store.get(sid, "local")
    assert np.array_equal(mask, session.label_map()[:, :, 12] == 1)
    infer(anatomical, "--box", *BOX, "--slice", 12, "--single-slice", "--task", "alpha", "--engines", engines,
          "--out", tmp_path / "infer")
    expected = np.asarray(Image.open(tmp_path / "infer" / "anatomical_mask0.png")) > 0
    assert np.array_equal(mask, expected)


def test_clicks_refine_undo_goes_back_and_reset_clears(client, anatomical):
    sid = upload(client, anatomical, task="alpha")["session_id"]
    boxed = decode(interact(client, sid, action="box", label="organ", slice=12, box=BOX)["masks"][0])
    y, x = np.argwhere(boxed)[len(np.argwhere(boxed)) // 2]
    clicked = interact(client, sid, action="click", label="organ", slice=12, point=[float(x), float(y)],
                       positive=False)
    assert clicked["undo_depth"] == 2 and not np.array_equal(decode(clicked["masks"][0]), boxed)
    undone = interact(client, sid, action="undo", label="organ", slice=12)
    assert undone["undo_depth"] == 1 and np.array_equal(decode(undone["masks"][0]), boxed)
    cleared = interact(client, sid, action="reset", label="organ")
    assert [m["slice"] for m in cleared["masks"]] == [12] and cleared["masks"][0]["bbox"] is None
    assert client.get(f"/api/sessions/{sid}").json()["labels"] == {}


def test_propagate_streams_ndjson_and_the_nifti_equals_casam_infers(client, anatomical, engines, tmp_path):
    sid = upload(client, anatomical, task="alpha")["session_id"]
    interact(client, sid, action="box", label="organ", slice=12, box=BOX)
    with client.stream("POST", f"/api/sessions/{sid}/propagate", json={"label": "organ", "slice": 12},
                       headers={"Accept": "application/x-ndjson"}) as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    progress = [line["progress"] for line in lines[:-1]]
    assert progress and [p["done"] for p in progress] == list(range(1, len(progress) + 1))
    result = check_reply("interaction", lines[-1]["result"])
    assert sorted(m["slice"] for m in result["masks"]) == sorted([12] + [p["slice"] for p in progress])
    download = client.get(f"/api/sessions/{sid}/result", params={"format": "nifti"})
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    ours = nib.Nifti1Image.from_bytes(gzip.decompress(download.content))
    infer(anatomical, "--box", *BOX, "--slice", 12, "--task", "alpha", "--engines", engines, "--out", tmp_path / "v")
    theirs = nib.load(str(tmp_path / "v" / "anatomical_mask.nii.gz"))
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert np.array_equal(ours.affine, theirs.affine) and ours.get_data_dtype() == np.uint8
    plain = client.post(f"/api/sessions/{sid}/propagate", json={"label": "organ", "slice": 12})
    assert plain.status_code == 200 and len(check_reply("interaction", plain.json())["masks"]) == len(result["masks"])


def test_a_png_session_downloads_casam_infers_png(client, pipe, engines, tmp_path):
    path = picture(tmp_path / "disc.png")
    described = upload(client, path)
    assert described["volume"] is False and described["slices"] == 1 and described["spacing"] is None
    reply = interact(client, described["session_id"], action="box", label="disc", box=PNG_BOX, mask_format="png")
    assert "png" in reply["masks"][0] and reply["route"]["mode"] == "image"
    mask = decode(reply["masks"][0])
    download = client.get(f"/api/sessions/{described['session_id']}/result", params={"format": "png"})
    assert download.status_code == 200
    infer(path, "--box", *PNG_BOX, "--engines", engines, "--out", tmp_path / "infer")
    expected = (tmp_path / "infer" / "disc_mask0.png").read_bytes()
    assert download.content == expected  # the same writer, the same mask: the same bytes
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(expected))) > 0, mask)
    assert uploads_left(tmp_path) == []  # a picture is held in memory: its upload folder went at once


def test_views_are_the_engines_slices_and_any_axis_with_a_window(client, anatomical):
    sid = upload(client, anatomical)["session_id"]
    session = client.app.state.casam.store.get(sid, "local")
    own = client.get(f"/api/sessions/{sid}/view", params={"slice": 12})
    assert own.status_code == 200 and own.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(own.content))), session.source.image(12))
    other = np.asarray(Image.open(io.BytesIO(client.get(f"/api/sessions/{sid}/view",
                                                        params={"axis": 0, "slice": 16, "center": 100,
                                                                "width": 200}).content)))
    raw = session.source.scan.data[16].astype(float)
    assert other.shape == (41, 25)
    assert np.array_equal(other == 0, raw <= 0) and np.array_equal(other == 255, raw >= 200)
    interact(client, sid, action="box", label="a", slice=12, box=BOX)
    labels = np.asarray(Image.open(io.BytesIO(client.get(f"/api/sessions/{sid}/labels/view",
                                                         params={"slice": 12}).content)))
    assert np.array_equal(labels, session.label_map()[:, :, 12])


def test_an_uploaded_volume_keeps_its_folder_until_the_session_closes(client, anatomical, tmp_path):
    sid = upload(client, anatomical)["session_id"]
    assert len(uploads_left(tmp_path)) == 1  # nibabel memory-maps the .nii from it
    assert client.delete(f"/api/sessions/{sid}").status_code == 204
    assert uploads_left(tmp_path) == []


def test_a_datastore_lists_and_opens_by_id(pipe, anatomical, tmp_path):
    store = tmp_path / "store"
    (store / "mr").mkdir(parents=True)
    (store / "mr" / "head.nii").write_bytes(anatomical.read_bytes())
    picture(store / "disc.png")
    (store / "notes.txt").write_text("not an image")
    with make_client(pipe, tmp_path, datastore=store) as client:
        listing = check_reply("datastore", client.get("/api/datastore").json())
        assert listing["images"] == [{"id": "disc.png", "name": "disc.png", "kind": "image"},
                                     {"id": "mr/head.nii", "name": "head.nii", "kind": "volume"}]
        reply = client.post("/api/sessions", json={"datastore_id": "mr/head.nii", "axis": 2})
        assert reply.status_code == 201 and check_reply("session", reply.json())["shape"] == [33, 41, 25]
        assert check_reply("info", client.get("/api/info").json())["datastore"] is True
        client.app.state.casam.store.shutdown()
    saved = LocalDatastore(store).save_label("mr/head.nii", b"label", ".nii.gz")
    assert saved == "labels/final/mr%2Fhead.nii.gz" and (store / saved).read_bytes() == b"label"


def test_the_mask_wire_format_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((17, 23)) < rng.random()
        for fmt in ("rle", "png"):
            assert np.array_equal(decode(encode(mask, fmt)), mask)
    assert runs(np.array([1, 1, 0, 1], bool)) == [0, 2, 1, 1]
    assert encode(np.zeros((4, 5), bool)) == {"shape": [4, 5], "bbox": None, "rle": []}
    wire = encode(np.pad(np.ones((2, 3), bool), ((1, 1), (2, 0))))
    assert wire == {"shape": [4, 5], "bbox": [2, 1, 5, 3], "rle": [0, 6]}
    with pytest.raises(ValueError):
        unruns([1, 2], 4)
