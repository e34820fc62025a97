"""``casam-infer DIR --server URL --concurrency N``: images/s at N = 1 and 8 (and any others),
against one local casam-serve on the tiny export, runs taking turns.

The client is the real CLI (``casam_infer.cli.main``, in this process so interpreter start-up is
not timed), writing masks and JSON records as a user's run would.

    .venv/bin/python bench/infer_concurrency.py --engines DIR [--images 16] [--levels 1,8] [--turns 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402

from casam_infer.cli import main as casam_infer  # noqa: E402
from casam_serve.process import ServerProcess  # noqa: E402


def images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")


def one_run(folder: Path, url: str, level: int, out: Path) -> float:
    """Wall seconds of one casam-infer run over the folder."""
    t0 = time.perf_counter()
    try:
        casam_infer([str(folder), "--box", "40", "60", "300", "280", "--server", url, "--concurrency", str(level),
                     "--quiet", "--out", str(out)], standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - a failed run is a failed benchmark
        if exc.code:
            raise
    return time.perf_counter() - t0


def in_process(folder: Path, engines: Path, turns: int) -> float:
    """Median wall seconds of one pass of ``Pipeline.predict`` over the folder's images."""
    from casam_io.image_io import image_files
    from runtime.pipeline import Pipeline
    from runtime.prompts import Prompts

    pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    arrays = [pipe.read(p)[0] for p in image_files(folder).values()]
    box = np.array([[40, 60, 300, 280]], np.float32)
    walls = []
    for _ in range(turns + 1):  # the first pass warms the sessions up
        t0 = time.perf_counter()
        for image in arrays:
            pipe.predict(image, Prompts.for_image(image.shape, boxes=box))
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls[1:])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--turns", type=int, default=2)
    add_results_option(parser)
    args = parser.parse_args(argv)
    run = start("infer_concurrency", argv)
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="casam_conc_") as tmp, ServerProcess(args.engines, max_batch=8) as server:
        folder = Path(tmp) / "images"
        folder.mkdir()
        images(folder, args.images)
        one_run(folder, server.grpc_url, max(levels), Path(tmp) / "warm")  # sessions, connections
        walls: dict[int, list[float]] = {n: [] for n in levels}
        for turn in range(args.turns):
            for n in levels:
                walls[n].append(one_run(folder, server.grpc_url, n, Path(tmp) / f"out{n}_{turn}"))
        local = in_process(folder, args.engines, args.turns)
    base = args.images / statistics.median(walls[levels[0]])
    table = Table.of(("--concurrency", "{:d}"), ("wall s", "{:.2f}"), ("images/s", "{:.2f}"), ("× concurrency 1", "{:.2f}×"))
    for n in levels:
        wall = statistics.median(walls[n])
        table.add(n, wall, args.images / wall, args.images / wall / base)
    ceiling = Table.of("what", ("images/s", "{:.2f}"), ("× concurrency 1", "{:.2f}×"))
    ceiling.add("the chain alone, in process", args.images / local, args.images / local / base)
    setup = (f"casam-infer --server --concurrency against a local casam-serve (--max-batch 8) on the tiny export; "
             f"{args.images} 512×512 RGB images, one box each; medians of {args.turns} turns, the levels taking "
             "turns. The chain alone: Pipeline.predict on the same images and box in this process, no server, no "
             "files written; the most any concurrency could reach here if it hid every cost but the chain's compute.")
    write_record(run, {"levels": table, "ceiling": ceiling}, setup=setup, folder=args.results_dir)

if __name__ == "__main__":
    main()
