"""Parameter counts of every model and the frozen encoder's time on this machine.

Usage: python bench/encoder_time.py [--runs 20] [--vit-b-runs 3] [--results-dir bench/results]
Counts are taken on the meta device (no memory); times are medians after one warm-up.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Table, start, write_record  # noqa: E402
from models.alignment import AlignmentLayer, count_parameters  # noqa: E402
from models.sam_loader import build_sam_architecture, freeze, load_frozen_sam  # noqa: E402
from models.vae import TaskVAE  # noqa: E402


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@click.command()
@click.option("--runs", default=20, show_default=True, help="timed runs of the tiny encoder")
@click.option("--vit-b-runs", default=3, show_default=True, help="timed runs of the vit_b encoder (0 to skip)")
@click.option("--results-dir", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(runs: int, vit_b_runs: int, results_dir: Path) -> None:
    run = start("encoder_time")
    params = Table.of("model", ("parameters", "{:,d}"))
    params.add("AlignmentLayer (3 CAResBlocks, 256)", count_parameters(AlignmentLayer()))
    params.add("TaskVAE (256→128→64)", count_parameters(TaskVAE()))
    for name in ("tiny", "vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            sam = build_sam_architecture(name)
        params.add(f"SAM {name} (all)", count_parameters(sam))
        params.add(f"SAM {name} image encoder", count_parameters(sam.image_encoder))
    x = torch.randn(1, 3, 1024, 1024)
    tiny = load_frozen_sam("tiny").model
    times = Table.of("encoder, 1×3×1024×1024, fp32 eager", ("median ms", "{:.1f}"), ("runs", "{:d}"))
    with torch.inference_mode():
        times.add("tiny (untrained)", median_ms(lambda: tiny.image_encoder(x), runs), runs)
        if vit_b_runs:
            vit_b = freeze(build_sam_architecture("vit_b"))
            times.add("vit_b (random weights)", median_ms(lambda: vit_b.image_encoder(x), vit_b_runs), vit_b_runs)
    setup = f"Parameter counts (on the meta device) and the frozen encoder's eager time, {torch.get_num_threads()} torch threads."
    write_record(run, {"parameters": params, "encoder_eager": times}, setup=setup, folder=results_dir)

if __name__ == "__main__":
    main()
