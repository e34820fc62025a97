"""Data-parallel scaling of task training: alignment-layer images/s and cache fill rate.

Runs the real trainer code (``EmbeddingCache.embeddings`` filling the cache in shards,
``train_epoch`` under DistributedDataParallel) through torchrun, once per layout of
processes × threads, on the same synthetic task and the same global batch:

    .venv/bin/python bench/train_scaling.py [--layouts 1x1,2x1,1x2] [--images 8] [--epochs 3]

``PxT`` is P processes (gloo on CPU, nccl on CUDA) of T threads each; ``1x2`` is a plain
run using two threads, the fair comparison for ``2x1`` on a 2-core machine. The fill rate
is images encoded per second into a fresh cache; training images/s is the mean over the
epochs after the first (the first pays oneDNN's kernel set-up). vit_b uses random weights
(same cost as the official ones). Results go to a record in bench/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.alignment import AlignmentLayer  # noqa: E402
from models.prompt_decoder import PromptDecoder  # noqa: E402
from casam_core.files import atomic_write_json, read_json  # noqa: E402
from common import Table, add_results_option, start, write_record  # noqa: E402
from runtime.preprocess import Preprocessing  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.distributed import join  # noqa: E402
from trainer.embedding_cache import EmbeddingCache  # noqa: E402
from trainer.session import resolve_device  # noqa: E402
from trainer.synthetic import write_synthetic_task  # noqa: E402
from trainer.train_task import TrainConfig, Trainee, train_epoch  # noqa: E402
from train_throughput import frozen  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One rank of one layout: fill a fresh cache, then train; rank 0 writes the timings."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    world = join(device)
    dev = torch.device("cuda") if device.type == "cuda" else device
    sam = frozen(args.sam)
    sam.model.to(dev)
    samples = load_dataset(args.data, test_fraction=0.0).train
    cache = EmbeddingCache(sam.model.image_encoder, sam.checkpoint_sha256, Preprocessing(), args.cache, dev,
                           quiet=True, batch_size=4 if dev.type == "cuda" else 1)

    def sync() -> None:
        world.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    embeddings = cache.embeddings(samples, world=world)
    sync()
    fill_s = time.perf_counter() - t0

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, masks_per_image=args.masks_per_image)
    torch.manual_seed(config.seed)
    layer = AlignmentLayer().to(dev)
    optimiser = torch.optim.Adam(layer.parameters(), lr=config.lr)
    model, decoder = world.wrap(layer), PromptDecoder(sam.model).to(dev)
    epochs = []
    for epoch in range(config.epochs):
        sync()
        t0 = time.perf_counter()
        train_epoch(Trainee(model, decoder, optimiser, dev), embeddings, samples, Preprocessing(), config, epoch,
                    world=world)
        sync()
        epochs.append(time.perf_counter() - t0)
    if world.is_main:
        atomic_write_json(args.result, {"fill_s": fill_s, "encoded": cache.misses, "epoch_s": epochs, "images": len(samples)})
    world.finish()


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_layout(args: argparse.Namespace, processes: int, threads: int, data: Path, work: Path) -> dict:
    result = work / f"result-{processes}x{threads}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--data", str(data),
           "--cache", str(work / f"cache-{processes}x{threads}"), "--result", str(result), "--sam", args.sam,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--masks-per-image", str(args.masks_per_image), "--device", args.device]
    before = load()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    row = read_json(result)
    later = row["epoch_s"][1:] or row["epoch_s"]
    row.update(layout=f"{processes}x{threads}", processes=processes, threads=threads, load_before=before, load_after=load(),
               fill_rate=row["images"] / row["fill_s"], train_rate=row["images"] * len(later) / sum(later))
    print(f"{row['layout']}: fill {row['fill_rate']:.3f} img/s, train {row['train_rate']:.3f} img/s "
          f"({before} → {row['load_after']})", flush=True)
    return row


def report(args: argparse.Namespace, rows: list[dict]) -> tuple[Table, str]:
    device = resolve_device(args.device)
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    base = next((r for r in rows if r["processes"] == 1 and r["threads"] == 1), rows[0])
    table = Table.of("layout", ("cache fill img/s", "{:.3f}"), (f"× {base['layout']}", "{:.2f}"),
                     ("train img/s", "{:.3f}"), (f"× {base['layout']}", "{:.2f}"), "epoch s", "load before → after")
    for r in rows:
        table.add(r["layout"], r["fill_rate"], r["fill_rate"] / base["fill_rate"], r["train_rate"],
                  r["train_rate"] / base["train_rate"], ", ".join(f"{s:.1f}" for s in r["epoch_s"]),
                  f"{r['load_before']} → {r['load_after']}")
    setup = (f"Data-parallel task training on {machine}: SAM {args.sam}; {args.images} synthetic 256×256 images; "
             f"global batch {args.batch_size}, {args.masks_per_image} masks per image, {args.epochs} epochs "
             f"(train rate: mean of epochs 2..{args.epochs}). Layout PxT = P processes × T threads.")
    return table, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="1x1,2x1,1x2", help="comma-separated PxT: P processes × T threads")
    parser.add_argument("--sam", default="tiny", choices=["tiny", "vit_b"])
    parser.add_argument("--images", type=int, default=8, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (≥2: the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch")
    parser.add_argument("--masks-per-image", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    add_results_option(parser)
    # set by the driver for its torchrun workers
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    run = start("train_scaling")
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_synthetic_task(work / "data", "stripes", args.images, seed=11)
        rows = [run_layout(args, p, t, data, work) for p, t in layouts]
    table, setup = report(args, rows)
    write_record(run, {"layouts": table}, setup=setup, folder=args.results_dir)


if __name__ == "__main__":
    main()
