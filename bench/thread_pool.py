"""onnxruntime thread pools: one per session (the runtime's default) against one per process
(``runtime.backends.ort.use_process_thread_pool(True)``).

onnxruntime chooses the kind of pool once per process, so each turn runs in a fresh
process: the two kinds take turns, ``--rounds`` times. Each process
  1. times ``--runs`` predictions of the tiny chain from one thread (one 768×1024 image, one
     box, route forced to a task, as in bench/infer_latency.py) after a warm-up;
  2. runs ``casam-infer`` (its CLI, in that process) on a folder of 16 images, which reads
     the next image and writes the last one's outputs on other threads while the chain runs.
The per-session pools sleep between operators; the process pool spins. Medians per kind.

    .venv/bin/python bench/thread_pool.py [--models tiny] [--rounds 4] [--runs 20] [--work DIR]

``--work`` shares bundles and exports with bench/infer_latency.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import Table, add_results_option, start, write_record  # noqa: E402
from runtime.pipeline import STAGES  # noqa: E402

KINDS = {"one pool per session": False, "one pool per process": True}

# One turn in a fresh interpreter: the pool kind must be chosen before the first session.
TURN = """
import json, sys
sys.path[:0] = [{root!r}, {bench!r}]
from runtime.backends.ort import use_process_thread_pool
use_process_thread_pool({shared!r})
from infer_latency import inputs
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
pipe = Pipeline.from_manifest({engines!r}, backend="ort-cpu")
image, boxes = inputs()
for _ in range(3):
    pipe.predict(image, Prompts.for_image(image.shape, boxes=boxes[:1]), task="alpha")
rows = [pipe.predict(image, Prompts.for_image(image.shape, boxes=boxes[:1]), task="alpha").timings_ms for _ in range({runs})]
import time
from casam_infer.cli import main
t0 = time.perf_counter()
main([{folder!r}, "--box", "40", "60", "300", "280", "--engines", {engines!r}, "--out", {out!r}, "--quiet"],
     standalone_mode=False)
print(json.dumps({{"predict": rows, "cli_s": time.perf_counter() - t0}}))
"""


def turn(engines: Path, shared: bool, runs: int, folder: Path, out: Path) -> dict[str, Any]:
    code = TURN.format(root=str(ROOT), bench=str(ROOT / "bench"), shared=shared, engines=str(engines), runs=runs,
                       folder=str(folder), out=str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_of_images(folder: Path) -> None:
    """16 PNGs for the CLI turn: the benchmark image and its mirror, in two sizes."""
    from PIL import Image

    from infer_latency import inputs

    folder.mkdir(parents=True, exist_ok=True)
    image = inputs()[0]
    for i in range(16):
        picture = image[:, ::-1] if i % 2 else image
        Image.fromarray(picture if i % 4 < 2 else picture[::2, ::2]).save(folder / f"im{i:02d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/casam_bench"))
    add_results_option(parser)
    args = parser.parse_args()
    run = start("thread_pool")
    from infer_latency import exported  # torch and the exporter: only here, not in the timed turns

    tables: dict[str, Table] = {}
    for name in args.models.split(","):
        _, _, engines = exported(name, args.work)
        rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        cli: dict[str, list[float]] = {kind: [] for kind in KINDS}
        with tempfile.TemporaryDirectory(prefix="casam_pool_") as tmp:
            folder_of_images(Path(tmp) / "images")
            for r in range(args.rounds):
                for kind, shared in KINDS.items():
                    got = turn(engines, shared, args.runs, Path(tmp) / "images", Path(tmp) / f"out{r}{shared}")
                    rows[kind] += got["predict"]
                    cli[kind].append(got["cli_s"])
        med = {kind: {s: statistics.median(r[s] for r in runs) for s in STAGES} for kind, runs in rows.items()}
        per_process, per_session = med["one pool per process"], med["one pool per session"]
        predict = Table.of("stage", ("one pool per session", "{:.1f}"), ("one pool per process", "{:.1f}"),
                           ("speed-up", "{:.2f}×"))
        for stage in STAGES:
            predict.add("**end to end**" if stage == "total" else stage, per_session[stage], per_process[stage],
                        per_session[stage] / per_process[stage])
        walls = {kind: statistics.median(v) for kind, v in cli.items()}
        folder = Table.of(("one pool per session", "{:.2f}"), ("one pool per process", "{:.2f}"), ("speed-up", "{:.2f}×"))
        folder.add(walls["one pool per session"], walls["one pool per process"],
                   walls["one pool per session"] / walls["one pool per process"])
        tables[f"{name}_predict"], tables[f"{name}_cli"] = predict, folder
    setup = (f"onnxruntime thread pools, one per session (default) against one per process. {args.rounds} rounds, "
             f"the two kinds taking turns, each turn a fresh process timing {args.runs} predictions after 3 "
             "warm-ups (768×1024 image, one box, route forced to a task). `<model>_predict`: Pipeline.predict "
             "from one thread, medians in ms over all runs of a kind; `<model>_cli`: casam-infer on a folder of "
             "16 images (8 at 768×1024, 8 at 384×512), wall s.")
    write_record(run, tables, setup=setup, folder=args.results_dir)

if __name__ == "__main__":
    main()
