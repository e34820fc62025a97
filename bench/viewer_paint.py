"""casam-label's viewer in Chromium: mouse-up → overlay painted, next to the HTTP round trip.

A real ``casam-label`` process (tiny SAM, fp32, ORT CPU) serves the page; Debian's Chromium,
driven by Playwright, opens a volume, warms the slice with one box (encoder, router,
alignment), then drags ``--prompts`` boxes of varying size on that slice with real mouse
events. The page marks ``mouseup`` at the mouse-up and ``painted`` in the animation frame
that draws the overlay, and times its fetch of ``/interact`` (request sent → reply parsed).
Per prompt: round trip (fetch), mouse-up → painted, and their difference, the page's own
cost (decoding the mask, painting the layers, waiting for the frame). The same boxes sent
by httpx from Python give the HTTP round trip without a browser. Two slice sizes: nibabel's
``anatomical.nii`` (33×41 slices) and a 512×512 CT-like volume (the paint cost scales with
the slice's pixels).

    .venv/bin/python bench/viewer_paint.py [--prompts 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from label_support import label_server  # noqa: E402
from common import Table, add_results_option, start, write_record  # noqa: E402
from infer_latency import exported  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def ct_volume(path: Path, size: int = 512, depth: int = 8) -> Path:
    """A size×size×depth int16 CT-like volume in HU (air, a body, a bright ellipsoid, noise)."""
    import nibabel as nib

    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (size, size, depth)), indexing="ij", sparse=True)
    c = size / 2
    body = ((x - c) / (0.43 * size)) ** 2 + ((y - c) / (0.35 * size)) ** 2 < 1
    target = ((x - c) / (0.18 * size)) ** 2 + ((y - c) / (0.18 * size)) ** 2 + ((z - depth / 2) / depth) ** 2 < 1
    hu = np.where(target, 120.0, np.where(body, 40.0, -1000.0)) + np.random.default_rng(0).normal(0, 12, (size, size, depth))
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0])), str(path))
    return path


def boxes(hw: tuple[int, int], n: int) -> list[list[int]]:
    """n boxes around the slice's centre, each a little different (no reply is cached)."""
    h, w = hw
    return [[int(w * (0.25 + 0.01 * (i % 5))), int(h * (0.25 + 0.01 * (i % 7))),
             int(w * (0.70 + 0.01 * (i % 3))), int(h * (0.72 + 0.01 * (i % 4)))] for i in range(n)]


def in_browser(page: Any, url: str, volume: Path, prompts: int) -> tuple[tuple[int, int], list[dict]]:
    """Open ``volume`` in the page, warm its middle slice, drag ``prompts`` boxes; the page's records."""
    page.goto(url + "/")
    page.wait_for_function("window.casamViewer && window.casamViewer.info")
    page.set_input_files("#file-input", str(volume))
    page.wait_for_function("window.casamViewer.session && window.casamViewer.drawn && !window.casamViewer.busy",
                           timeout=300_000)
    hw = tuple(page.evaluate("window.casamViewer.session.sliceHW()"))
    todo = boxes(hw, prompts + 1)
    for i, box in enumerate(todo):
        a = page.evaluate(f"window.casamViewer.view.toClient({box[0]}, {box[1]})")
        b = page.evaluate(f"window.casamViewer.view.toClient({box[2]}, {box[3]})")
        page.mouse.move(*a)
        page.mouse.down()
        page.mouse.move(*b, steps=4)
        page.mouse.up()
        page.wait_for_function(f"window.casamViewer.latencies.length >= {i + 1}", timeout=300_000)
    return hw, page.evaluate("window.casamViewer.latencies")[1:]  # the first box paid for the encoder


def over_http(url: str, volume: Path, hw: tuple[int, int], prompts: int) -> list[float]:
    """The same boxes from Python (httpx, keep-alive): the round trip without a browser, ms."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client, open(volume, "rb") as f:
        sid = client.post("/api/sessions", files={"file": (volume.name, f)}).json()["session_id"]
        out = []
        for i, box in enumerate(boxes(hw, prompts + 1)):
            t0 = time.perf_counter()
            reply = client.post(f"/api/sessions/{sid}/interact", json={"action": "box", "label": "b", "box": box})
            reply.raise_for_status()
            reply.json()
            if i:
                out.append((time.perf_counter() - t0) * 1e3)
        client.delete(f"/api/sessions/{sid}")
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20, help="boxes per volume after the warm-up box")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    add_results_option(parser)
    args = parser.parse_args()
    from nibabel.testing import data_path
    from playwright.sync_api import sync_playwright

    run = start("viewer_paint")
    work = args.work or Path(tempfile.mkdtemp(prefix="casam_viewer_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    _, _, engines = exported("tiny", work)
    volumes = {"anatomical.nii": Path(data_path) / "anatomical.nii", "CT 512²": ct_volume(work / "ct512.nii.gz")}
    table = Table.of(("volume", "{}"), ("slice", "{}"), ("prompts", "{}"), ("HTTP p50 (httpx)", "{:.1f}"),
                     ("round trip p50 (page)", "{:.1f}"), ("mouse-up → painted p50", "{:.1f}"),
                     ("mouse-up → painted p95", "{:.1f}"), ("painting adds p50", "{:.1f}"),
                     ("painting adds p95", "{:.1f}"))
    with label_server(engines, work / "server.log") as (url, _), sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(work / "profile"), executable_path=args.chromium,
                                                        headless=True, args=CHROMIUM_ARGS,
                                                        viewport={"width": 1280, "height": 800})
        for name, volume in volumes.items():
            print(f"{name}: in Chromium…", flush=True)
            page = context.new_page()
            hw, records = in_browser(page, url, volume, args.prompts)
            page.close()
            print(f"{name}: over HTTP…", flush=True)
            http = over_http(url, volume, hw, args.prompts)
            trip = [r["roundtrip_ms"] for r in records]
            total = [r["mouseup_to_painted_ms"] for r in records]
            extra = [t - r for t, r in zip(total, trip)]
            table.add(name, f"{hw[0]}×{hw[1]}", len(records), statistics.median(http), statistics.median(trip),
                      statistics.median(total), pct(total, 95), statistics.median(extra), pct(extra, 95))
        context.close()
    setup = (f"casam-label (tiny SAM, fp32, ORT CPU) and its viewer in headless Chromium (Playwright, real mouse "
             f"events), on this machine's CPU. After one warm-up box, {args.prompts} boxes on the same slice "
             "(decoder only). 'round trip': the page's fetch of /interact; 'mouse-up → painted': "
             "performance marks from the mouse-up to the animation frame that draws the overlay; 'painting adds': "
             "their difference per prompt. ms.")
    write_record(run, {"paint": table}, setup=setup, notes=["issue #23's target: painting adds at most 30 ms."],
                 folder=args.results_dir)


if __name__ == "__main__":
    main()
