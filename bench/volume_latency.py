"""Volume inference cost: per-slice time in volume mode against single-image casam-infer, the
gain from encoder batching, and the peak RSS of a 64-slice 512×512 CT volume.

Measured in one run on the tiny SAM (random weights, fp32 export, ORT CPU), side by side:
  1. single image: ``Pipeline.predict`` on one 512×512 slice (windowed as casam-infer does),
     per slice, over ``--single`` slices, in this process (sessions already open: the
     strict comparison); and, as the issue words it, single-image ``casam-infer VOLUME
     --single-slice --slice K --box …`` run once per slice (a process per slice, over ``--cli`` slices);
  2. volume mode: ``segment_volume`` over all 64 slices (a 3-D box covering them, volume
     routing), with ``--batch 1`` and each of ``--batches``; per-slice cost = total / 64.
     The runs take turns, so they share the background load.
  3. peak RSS (VmHWM) of a ``casam-infer VOLUME --box3d …`` process on the same volume.

    .venv/bin/python bench/volume_latency.py [--runs 2] [--batches 4,8] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from infer_latency import RSS_PROBE, exported  # noqa: E402

from casam_io.image_io import read_scan  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.prompts import Prompts  # noqa: E402
from runtime.volume import Propagation, VolumeSegmenter, segment_volume  # noqa: E402

SHAPE = (512, 512, 64)
BOX = (150.0, 160.0, 360.0, 370.0)


def ct_volume(path: Path) -> Path:
    """A 512×512×64 int16 CT-like volume in HU: air outside a body, soft tissue, a bright
    ellipsoid (the target), noise; saved as NIfTI with 0.7×0.7×2.5 mm voxels."""
    import nibabel as nib

    if path.exists():
        return path
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij", sparse=True)
    body = ((x - 256) / 220) ** 2 + ((y - 256) / 180) ** 2 < 1
    target = ((x - 260) / 90) ** 2 + ((y - 265) / 90) ** 2 + ((z - 32) / 22) ** 2 < 1
    rng = np.random.default_rng(0)
    hu = np.where(target, 120.0, np.where(body, 40.0, -1000.0)) + rng.normal(0, 12, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0])), str(path))
    return path


def single_images(pipe: Pipeline, scan, count: int) -> float:
    """ms per slice: read-prepared 2-D slice → Pipeline.predict, as single-image casam-infer."""
    slicer = VolumeSegmenter(pipe, scan)
    picks = np.linspace(0, SHAPE[2] - 1, count).round().astype(int)
    t0 = time.perf_counter()
    for k in picks:
        image = slicer.slice_image(int(k))
        pipe.predict(image, Prompts.for_image(image.shape, boxes=np.asarray([BOX], np.float32)))
    slicer.close()
    return (time.perf_counter() - t0) * 1000.0 / count


def single_cli(engines: Path, volume: Path, work: Path, count: int) -> float:
    """ms per slice: one ``casam-infer VOLUME --single-slice --slice K --box …`` process per slice."""
    picks = np.linspace(0, SHAPE[2] - 1, count).round().astype(int)
    t0 = time.perf_counter()
    for k in picks:
        subprocess.run([sys.executable, "-m", "casam_infer.cli", str(volume), "--single-slice", "--slice", str(int(k)), "--box",
                        *(str(v) for v in BOX), "--engines", str(engines), "--backend", "ort-cpu",
                        "--out", str(work / "single_cli_out"), "--quiet"],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return (time.perf_counter() - t0) * 1000.0 / count


def volume_mode(pipe: Pipeline, scan, batch: int) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    prompts = Prompts.for_volume(scan.data.shape, 2, box3d=[(BOX[0], BOX[1], 0, BOX[2], BOX[3], SHAPE[2] - 1)])
    result = segment_volume(pipe, scan, prompts, settings=Propagation(batch=batch))
    ms = (time.perf_counter() - t0) * 1000.0 / SHAPE[2]
    return ms, {"passes": result.passes, "route": result.route, **{k: v / SHAPE[2] for k, v in result.timings_ms.items()}}


def peak_rss_mb(engines: Path, volume: Path, work: Path, batch: int) -> float:
    report = work / "volume_rss_kb.txt"
    cmd = [sys.executable, "-c", RSS_PROBE, str(report), str(volume), "--box3d", *(str(v) for v in
           (BOX[0], BOX[1], 0, BOX[2], BOX[3], SHAPE[2] - 1)), "--batch", str(batch), "--engines", str(engines),
           "--backend", "ort-cpu", "--out", str(work / "volume_rss_out"), "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(report.read_text()) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="rounds; each runs every mode once, in turn")
    parser.add_argument("--single", type=int, default=8, help="slices per single-image measurement")
    parser.add_argument("--cli", type=int, default=3, help="slices per single-image casam-infer measurement")
    parser.add_argument("--batches", default="4,8", help="encoder batch sizes to compare with --batch 1")
    parser.add_argument("--work", type=Path, default=None)
    add_results_option(parser)
    args = parser.parse_args()
    run = start("volume_latency")
    work = args.work or Path(tempfile.mkdtemp(prefix="casam_volume_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    _, _, engines = exported("tiny", work)
    volume = ct_volume(work / "ct.nii.gz")
    pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    scan = read_scan(volume)
    batches = [1] + [int(b) for b in args.batches.split(",")]
    single_images(pipe, scan, 2)  # warm-up: sessions, alignment engines, cached matrices
    single: list[float] = []
    cli: list[float] = []
    vol: dict[int, list[float]] = {b: [] for b in batches}
    detail: dict[int, dict[str, Any]] = {}
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs}: single images…", flush=True)
        single.append(single_images(pipe, scan, args.single))
        print(f"round {r + 1}/{args.runs}: single-image casam-infer processes…", flush=True)
        cli.append(single_cli(engines, volume, work, args.cli))
        for b in batches:
            print(f"round {r + 1}/{args.runs}: volume mode, batch {b}…", flush=True)
            ms, detail[b] = volume_mode(pipe, scan, b)
            vol[b].append(ms)
    print("peak RSS…", flush=True)
    rss = peak_rss_mb(engines, volume, work, max(batches))
    setup = (f"Volume inference, tiny SAM, ORT CPU. Volume: {SHAPE[0]}×{SHAPE[1]}×{SHAPE[2]} int16 CT (NIfTI), one "
             f"3-D box over all {SHAPE[2]} slices, volume routing. Single image: Pipeline.predict on one windowed "
             f"slice with the same box ({args.single} slices per round); single-image casam-infer: a process per "
             f"slice ({args.cli} slices). Modes take turns; medians of {args.runs} rounds, ms per slice.")
    write_record(run, tables(single, cli, vol, detail, rss, max(batches)), setup=setup, folder=args.results_dir)


def tables(single: list[float], cli: list[float], vol: dict[int, list[float]], detail: dict[int, dict[str, Any]],
           rss: float, rss_batch: int) -> dict[str, Table]:
    med = statistics.median
    s, c = med(single), med(cli)
    one = med(vol[1])
    modes = Table.of("mode", ("ms / slice", "{:.1f}"), ("vs single image (in process)", "{:.2f}×"),
                     ("vs casam-infer per slice", "{:.2f}×"), ("vs volume batch 1", "{:.2f}×"),
                     ("encoder ms / slice", "{:.1f}"), ("align + decoder + masks ms / slice", "{:.1f}"),
                     ("passes", "{:d}"))
    modes.add("single-image casam-infer, a process per slice", c, s / c, 1.0, None, None, None, None)
    modes.add("single image, Pipeline.predict in process", s, 1.0, c / s, None, None, None, None)
    for b, runs in vol.items():
        v, d = med(runs), detail[b]
        modes.add(f"volume, --batch {b}", v, s / v, c / v, one / v, d["encoder"], d["decoder"], d["passes"])
    peak = Table.of("run", ("peak RSS MB", "{:.0f}"))
    peak.add(f"casam-infer on the volume, --batch {rss_batch}", rss)
    return {"modes": modes, "rss": peak}

if __name__ == "__main__":
    main()
