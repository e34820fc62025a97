"""The browser viewer of casam-label, driven in a real Chromium (Debian's) by Playwright.

A real ``casam-label`` process serves the page and the API on a free localhost port. Each
test drives the page with real mouse and keyboard events and checks what it shows against
the JSON API called directly, in a session of its own, with the same prompts: the overlay's
pixels against the API's mask, the download's bytes against the API's file, the route label
against what ``casam-infer`` reports for the same image.

Screenshots of every state go to ``$CASAM_ARTIFACTS`` (or the test's tmp folder); the path
is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import missing, need
from label_support import label_server

CHROMIUM = Path(os.environ.get("CASAM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT_WAIT_MS = 180_000  # the first prompt on a volume encodes five slices on a busy 2-core CPU


# ----- the server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(engines: Path, tmp_path_factory) -> Iterator[str]:
    """A real casam-label process on 127.0.0.1 (the seeded tiny export); stopped at the end."""
    need("fastapi", "interactive")
    with label_server(engines, tmp_path_factory.mktemp("label_server") / "server.log") as (url, _):
        yield url


@pytest.fixture
def api(server: str) -> Iterator[Any]:
    """The JSON API called directly (its own sessions), as the reference for the page."""
    httpx = need("httpx", "interactive")
    with httpx.Client(base_url=server, timeout=300) as client:
        yield client


# ----- the browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    sync_api = need("playwright.sync_api", "dev")
    if not CHROMIUM.is_file():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; make test does it as root)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800}, accept_downloads=True)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    """Where this test's screenshots go: $CASAM_ARTIFACTS/<test>, else the test's tmp folder."""
    base = os.environ.get("CASAM_ARTIFACTS")
    folder = Path(base) / request.node.name if base else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nviewer screenshots: {folder}")
    return folder


@pytest.fixture
def page(browser, server: str) -> Iterator[Any]:
    """The viewer, loaded fresh; a script error on the page fails the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(server + "/")
    tab.wait_for_function("window.casamViewer && window.casamViewer.info")
    yield tab
    tab.close()
    assert not errors, f"script errors on the page: {errors}"


def shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def open_file(page: Any, path: Path) -> dict:
    """Open ``path`` through the page's file input; wait until its slice is drawn."""
    page.evaluate("window.casamViewer.drawn = null")
    page.set_input_files("#file-input", str(path))
    page.wait_for_function("window.casamViewer.session && window.casamViewer.drawn && !window.casamViewer.busy")
    return page.evaluate("window.casamViewer.session.d")


def drag_box(page: Any, box: list[int]) -> None:
    """Drag a box with real mouse events between the screen points of two slice points."""
    a = page.evaluate(f"window.casamViewer.view.toClient({box[0]}, {box[1]})")
    b = page.evaluate(f"window.casamViewer.view.toClient({box[2]}, {box[3]})")
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, steps=3)
    page.mouse.move(*b, steps=3)
    page.mouse.up()


def click_at(page: Any, x: int, y: int, shift: bool = False) -> None:
    """A click at the centre of slice pixel (x, y)."""
    point = page.evaluate(f"window.casamViewer.view.toClient({x + 0.5}, {y + 0.5})")
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(*point)
    if shift:
        page.keyboard.up("Shift")


def painted(page: Any, count: int) -> None:
    """Wait for the ``count``-th prompt's overlay to be painted."""
    page.wait_for_function(f"window.casamViewer.latencies.length >= {count}", timeout=PROMPT_WAIT_MS)


def overlay(page: Any) -> np.ndarray:
    """The mask layer's pixels (set where its alpha is), read from the canvas with getImageData."""
    data = page.evaluate("""() => {
        const c = window.casamViewer.view.mask;
        const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        const alpha = []; for (let i = 3; i < px.length; i += 4) alpha.push(px[i]);
        return {w: c.width, h: c.height, alpha};
    }""")
    return np.asarray(data["alpha"], dtype=np.uint8).reshape(data["h"], data["w"]) > 0


def error_line(page: Any) -> str:
    return page.evaluate("document.querySelector('#error').hidden ? '' : document.querySelector('#error').textContent")


# ----- the reference: the API called directly -------------------------------------------------
def decode(wire: dict, hw: tuple[int, int]) -> np.ndarray:
    """A mask off the wire (bounding region, row-major runs starting with zeros) → H×W bool."""
    out = np.zeros(hw, dtype=bool)
    if wire["bbox"] is None:
        return out
    x0, y0, x1, y1 = wire["bbox"]
    values = np.arange(len(wire["rle"])) % 2 == 1
    out[y0:y1, x0:x1] = np.repeat(values, wire["rle"]).reshape(y1 - y0, x1 - x0)
    return out


def api_open(api: Any, path: Path) -> dict:
    with open(path, "rb") as f:
        reply = api.post("/api/sessions", files={"file": (path.name, f)}, data={"axis": "2"})
    assert reply.status_code == 201, reply.text
    return reply.json()


def api_act(api: Any, sid: str, body: dict) -> dict:
    reply = api.post(f"/api/sessions/{sid}/interact", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def mask_of(reply: dict, k: int, hw: tuple[int, int]) -> np.ndarray:
    return decode(next(m for m in reply["masks"] if m["slice"] == k), hw)


def same_nifti_gz(a: bytes, b: bytes) -> None:
    """Byte-identical .nii.gz files, every byte (the gzip header's MTIME included: casam's
    writer stamps 0 there, so a download made later is the same file)."""
    assert gzip.decompress(a) == gzip.decompress(b), "the downloaded NIfTI holds other labels than the API's"
    assert a == b, "the downloaded .nii.gz differs from the API's in its gzip bytes"


# ----- tests ------------------------------------------------------------------------------------
def anatomical() -> Path:
    nibabel_testing = need("nibabel.testing")
    return Path(nibabel_testing.data_path) / "anatomical.nii"


BOX = [8, 10, 25, 30]  # slice pixels on slice 12 of anatomical.nii (33 × 41 × 25), axis 2
SLICE = 12


def goto_slice(page: Any, k: int) -> None:
    """Scroll with the wheel (away) and the arrow keys (back) to slice k of the prompting axis."""
    start = page.evaluate("window.casamViewer.session.current()")
    view = page.locator("#view").bounding_box()
    page.mouse.move(view["x"] + view["width"] / 2, view["y"] + view["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, 100)
    page.wait_for_function(f"window.casamViewer.session.current() === {min(start + 3, 24)}")
    page.locator("#stage").focus()
    now = page.evaluate("window.casamViewer.session.current()")
    for _ in range(abs(now - k)):
        page.keyboard.press("ArrowUp" if now > k else "ArrowDown")
    page.wait_for_function(f"window.casamViewer.drawn === '2:{k}'")


def test_box_on_a_real_volume_overlays_the_api_mask(page: Any, api: Any, artifacts: Path) -> None:
    """anatomical.nii through the file input, slice 12, a box dragged with the mouse: the
    overlay's pixels are the mask the JSON API returns for the same box."""
    path = anatomical()
    described = open_file(page, path)
    assert described["shape"] == [33, 41, 25] and described["axis"] == 2
    shot(page, artifacts, "1-opened")
    goto_slice(page, SLICE)
    drag_box(page, BOX)
    painted(page, 1)
    sent = page.evaluate("window.casamViewer.lastRequest")
    assert sent == {"action": "box", "box": BOX, "label": "label-1", "slice": SLICE}
    shot(page, artifacts, "2-box")

    ref = api_open(api, path)
    hw = tuple(ref["slice_shape"])
    expected = mask_of(api_act(api, ref["session_id"], {"action": "box", "label": "x", "slice": SLICE, "box": BOX}),
                       SLICE, hw)
    shown = overlay(page)
    assert shown.shape == hw and expected.any()
    assert np.array_equal(shown, expected), f"{int((shown != expected).sum())} overlay pixels differ from the API's mask"
    # The decision panel names the task the API reports, and draws one bar per task.
    route = api.get(f"/api/sessions/{ref['session_id']}").json()["route"]
    assert page.text_content("#route-task") == (
        "plain SAM (no task matched)" if route["plain_sam"] else f"task {route['task']}")
    assert page.locator("#scores g[data-task]").count() == len(route["scores"])
    marks = page.evaluate("""() => ({up: performance.getEntriesByName('mouseup').length,
                                     painted: performance.getEntriesByName('painted').length,
                                     roundtrip: performance.getEntriesByName('roundtrip').length})""")
    assert marks["up"] >= 1 and marks["painted"] == 1 and marks["roundtrip"] >= 1


def test_correct_undo_propagate_and_download(page: Any, api: Any, artifacts: Path, tmp_path: Path) -> None:
    """A negative click inside the mask shrinks it, undo restores it, propagate fills the
    neighbouring slices, and the download is the API's NIfTI for the same prompts."""
    path = anatomical()
    open_file(page, path)
    goto_slice(page, SLICE)
    drag_box(page, BOX)
    painted(page, 1)
    before = overlay(page)
    ref = api_open(api, path)
    sid, hw = ref["session_id"], tuple(ref["slice_shape"])
    act = lambda body: api_act(api, sid, {"label": "x", "slice": SLICE, **body})  # noqa: E731
    assert np.array_equal(before, mask_of(act({"action": "box", "box": BOX}), SLICE, hw))

    # A negative click on a mask pixel near the box's centre (the API decides the same click).
    ys, xs = np.nonzero(before)
    centre = np.array([(BOX[0] + BOX[2]) / 2, (BOX[1] + BOX[3]) / 2])
    i = int(np.argmin((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2))
    x, y = int(xs[i]), int(ys[i])
    click_at(page, x, y, shift=True)
    painted(page, 2)
    assert page.evaluate("window.casamViewer.lastRequest") == {
        "action": "click", "point": [x, y], "positive": False, "label": "label-1", "slice": SLICE}
    shrunk = overlay(page)
    shot(page, artifacts, "3-negative-click")
    assert np.array_equal(shrunk, mask_of(act({"action": "click", "point": [x, y], "positive": False}), SLICE, hw))
    assert shrunk.sum() < before.sum(), "the negative click did not shrink the mask"

    shown = page.evaluate("window.casamViewer.shown")
    page.keyboard.press("Control+z")
    page.wait_for_function(f"window.casamViewer.shown > {shown}")
    assert page.evaluate("window.casamViewer.session.stack('label-1', 12).length") == 1
    assert np.array_equal(overlay(page), before), "undo did not restore the mask"
    act({"action": "undo"})
    shot(page, artifacts, "4-undo")

    page.click("#propagate")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('propagated')",
                           timeout=PROMPT_WAIT_MS)
    shot(page, artifacts, "5-propagated")
    progress = api.post(f"/api/sessions/{sid}/propagate", json={"label": "x", "slice": SLICE})
    assert progress.status_code == 200, progress.text
    for k in (SLICE - 1, SLICE + 1):
        page.locator("#stage").focus()
        page.keyboard.press("ArrowUp" if k < SLICE else "ArrowDown")
        page.wait_for_function(f"window.casamViewer.drawn === '2:{k}'")
        shown = overlay(page)
        assert shown.any(), f"no overlay on slice {k} after propagate"
        assert np.array_equal(shown, mask_of(progress.json(), k, hw))
        shot(page, artifacts, f"6-slice-{k}")
        page.keyboard.press("ArrowDown" if k < SLICE else "ArrowUp")
        page.wait_for_function(f"window.casamViewer.drawn === '2:{SLICE}'")

    # The page offers the formats the session description lists: NIfTI for a NIfTI, no DICOM SEG.
    assert page.eval_on_selector_all("#save-format option", "els => els.map((e) => e.value)") == ["nifti"]
    with page.expect_download() as download:
        page.click("#save")
    saved = tmp_path / "download.nii.gz"
    download.value.save_as(str(saved))
    assert download.value.suggested_filename.endswith(".nii.gz")
    reference = api.get(f"/api/sessions/{sid}/result", params={"format": "nifti"})
    assert reference.status_code == 200, reference.text
    same_nifti_gz(saved.read_bytes(), reference.content)


def demo_image(folder: Path) -> tuple[Path, list[int]]:
    """A fresh image of the demo's 'stripes' task (seed 7, as demo.sh), and the tight box of
    its largest structure (demo.sh's prompt)."""
    from PIL import Image

    from trainer.synthetic import write_synthetic_task

    root = write_synthetic_task(folder / "stripes", "stripes", count=1, seed=7)
    image = next((root / "images").glob("*.png"))
    labels = np.asarray(Image.open(next((root / "masks").glob("*.png"))))
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    ys, xs = np.nonzero(labels == values[np.argmax(counts)])
    return image, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_picture_route_label_is_casam_infers(page: Any, api: Any, engines: Path, artifacts: Path,
                                             tmp_path: Path) -> None:
    """A demo 2-D image and a box: the page's route label names the task casam-infer reports."""
    from click.testing import CliRunner

    from casam_infer.cli import main as infer

    image, box = demo_image(tmp_path)
    described = open_file(page, image)
    assert described["volume"] is False
    drag_box(page, box)
    painted(page, 1)
    shot(page, artifacts, "1-picture-box")
    out = tmp_path / "infer"
    result = CliRunner().invoke(infer, [str(image), "--box", *map(str, box), "--engines", str(engines),
                                        "--backend", "ort-cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    route = json.loads((out / f"{image.stem}.json").read_text())["route"]
    expected = "plain SAM (no task matched)" if route == "identity" else f"task {route}"
    assert page.text_content("#route-task") == expected
    # The PNG download is the API's, for the same box.
    ref = api_open(api, image)
    api_act(api, ref["session_id"], {"action": "box", "label": "x", "box": box})
    with page.expect_download() as download:
        page.click("#save")
    saved = tmp_path / "mask.png"
    download.value.save_as(str(saved))
    assert saved.read_bytes() == api.get(f"/api/sessions/{ref['session_id']}/result", params={"format": "png"}).content


def test_a_refused_upload_shows_one_line_and_the_page_goes_on(page: Any, artifacts: Path, tmp_path: Path) -> None:
    """A truncated NIfTI: the server's error as one line on the page; then a good file opens."""
    good = anatomical()
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(good.read_bytes()[:1000])
    page.set_input_files("#file-input", str(bad))
    page.wait_for_function("!document.querySelector('#error').hidden && !window.casamViewer.busy")
    line = error_line(page)
    shot(page, artifacts, "1-refused")
    assert line and "\n" not in line and "Traceback" not in line
    assert page.evaluate("window.casamViewer.session") is None
    described = open_file(page, good)
    assert described["shape"] == [33, 41, 25]
    assert error_line(page) == ""
    shot(page, artifacts, "2-then-opened")
