"""Parameter counts of every model and the frozen encoder's time on this machine.

Usage: python bench/encoder_time.py [--runs 20] [--vit-b-runs 3] [--out bench/results/encoder_time.md]
Counts are taken on the meta device (no memory); times are medians after one warm-up.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import click
import torch

from models.alignment import AlignmentLayer, count_parameters
from models.sam_loader import build_sam_architecture, freeze, load_frozen_sam
from models.vae import TaskVAE


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
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/encoder_time.md"), show_default=True)
def main(runs: int, vit_b_runs: int, out: Path) -> None:
    lines = [f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}", ""]
    lines += ["| model | parameters |", "|---|---|"]
    lines.append(f"| AlignmentLayer (3 CAResBlocks, 256) | {count_parameters(AlignmentLayer()):,} |")
    lines.append(f"| TaskVAE (256→128→64) | {count_parameters(TaskVAE()):,} |")
    for name in ("tiny", "vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            sam = build_sam_architecture(name)
        lines.append(f"| SAM {name} (all) | {count_parameters(sam):,} |")
        lines.append(f"| SAM {name} image encoder | {count_parameters(sam.image_encoder):,} |")
    x = torch.randn(1, 3, 1024, 1024)
    tiny = load_frozen_sam("tiny").model
    with torch.inference_mode():
        lines += ["", "| encoder, 1×3×1024×1024, fp32 eager | median ms | runs |", "|---|---|---|"]
        lines.append(f"| tiny (untrained) | {median_ms(lambda: tiny.image_encoder(x), runs):.1f} | {runs} |")
        if vit_b_runs:
            vit_b = freeze(build_sam_architecture("vit_b"))
            lines.append(f"| vit_b (random weights) | {median_ms(lambda: vit_b.image_encoder(x), vit_b_runs):.1f} | {vit_b_runs} |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    click.echo(text)


if __name__ == "__main__":
    main()
