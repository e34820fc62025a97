"""Alignment-layer training throughput with and without the embedding cache.

Without the cache every epoch re-encodes every image with the frozen encoder; with it,
only the first epoch does, and later epochs read fp16 embeddings from disk. The script
trains the same synthetic task both ways (real trainer code: ``train_epoch`` and
``EmbeddingCache``) and reports images/s per epoch and the speed-up of the cached epochs.

    .venv/bin/python bench/train_throughput.py [--models tiny,vit_b] [--images 4] [--epochs 2]

vit_b uses random weights (segment-anything's architecture, frozen): throughput does not
depend on the weight values. Results go to a record in bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.alignment import AlignmentLayer  # noqa: E402
from models.prompt_decoder import PromptDecoder  # noqa: E402
from models.sam_loader import FrozenSam, build_sam_architecture, freeze, load_frozen_sam  # noqa: E402
from common import Table, add_results_option, start, write_record  # noqa: E402
from runtime.preprocess import Preprocessing  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.embedding_cache import EmbeddingCache  # noqa: E402
from trainer.session import resolve_device  # noqa: E402
from trainer.synthetic import write_synthetic_task  # noqa: E402
from trainer.train_task import TrainConfig, Trainee, train_epoch  # noqa: E402


def frozen(name: str) -> FrozenSam:
    if name == "tiny":
        return load_frozen_sam("tiny")
    torch.manual_seed(0)
    return FrozenSam(freeze(build_sam_architecture(name)), name, f"random-{name}-bench", untrained=True)


def run(name: str, images: int, epochs: int, masks: int, device: torch.device, workdir: Path) -> list[dict]:
    sam = frozen(name)
    sam.model.to(device)
    data = write_synthetic_task(workdir / "data", "stripes", images, seed=11)
    samples = load_dataset(data, test_fraction=0.0).train
    prep = Preprocessing()
    config = TrainConfig(epochs=epochs, batch_size=min(6, images), masks_per_image=masks)
    decoder = PromptDecoder(sam.model).to(device)
    rows = []
    for cached in (False, True):
        cache = EmbeddingCache(sam.model.image_encoder, sam.checkpoint_sha256, prep, workdir / f"cache-{name}",
                               device, enabled=cached, quiet=True, batch_size=1)
        torch.manual_seed(0)
        layer = AlignmentLayer().to(device)
        optimiser = torch.optim.Adam(layer.parameters(), lr=config.lr)
        for epoch in range(epochs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            embeddings = cache.embeddings(samples)
            t1 = time.perf_counter()
            train_epoch(Trainee(layer, decoder, optimiser, device), embeddings, samples, prep, config, epoch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            rows.append({"model": name, "cache": cached, "epoch": epoch + 1, "embed_s": t1 - t0, "train_s": t2 - t1,
                         "images_per_s": len(samples) / (t2 - t0)})
            print(f"{name:6s} cache={'on ' if cached else 'off'} epoch {epoch + 1}: embed {t1 - t0:7.2f}s  "
                  f"train {t2 - t1:7.2f}s  {len(samples) / (t2 - t0):6.3f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,vit_b", help="comma-separated SAM models")
    parser.add_argument("--images", type=int, default=4, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per mode (≥2: the first fills the cache)")
    parser.add_argument("--masks-per-image", type=int, default=5, help="prompts per image and step (METHOD.md: 5)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_results_option(parser)
    args = parser.parse_args()
    run = start("train_throughput")
    device = resolve_device(args.device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += run(name, args.images, args.epochs, args.masks_per_image, device, Path(tmp) / name)
    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    epochs = Table.of("model", "cache", ("epoch", "{:d}"), ("encode s", "{:.2f}"), ("train s", "{:.2f}"),
                      ("images/s", "{:.3f}"))
    for r in rows:
        epochs.add(r["model"], "on" if r["cache"] else "off", r["epoch"], r["embed_s"], r["train_s"], r["images_per_s"])
    speedup = Table.of("model", ("cache on ÷ off, epochs after the first", "{:.2f}×"))
    for name in args.models.split(","):
        later = lambda cached: [r["images_per_s"] for r in rows if r["model"] == name and r["cache"] == cached and r["epoch"] > 1]  # noqa: E731
        on, off = later(True), later(False)
        if on and off:
            speedup.add(name, sum(on) / len(on) / (sum(off) / len(off)))
    setup = (f"Alignment-layer training throughput, embedding cache on/off, on {machine}: {args.images} synthetic "
             f"256×256 images, batch {min(6, args.images)}, {args.masks_per_image} masks per image, {args.epochs} "
             "epochs per mode. vit_b has random weights (same cost as the official ones). Speed-up: mean images/s "
             "of the epochs after the first, cache on ÷ cache off.")
    write_record(run, {"epochs": epochs, "speedup": speedup}, setup=setup, folder=args.results_dir)

if __name__ == "__main__":
    main()
