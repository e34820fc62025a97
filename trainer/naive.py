"""The paper's "SAM + AL (naive)" baseline: one alignment layer fine-tuned task after task.

There is no router and no per-task layer: stage t continues training the layer left by
stage t−1 on task t's training images only, with the same loss, prompts, batch size and
epochs as a CA-SAM task (``trainer.train_task.train_epoch``), so the only difference
between the two methods is what CA-SAM adds (one frozen layer per task, VAE routing).
What the layer forgets about earlier tasks is exactly what the FF metric measures.

Its per-stage weights are an experiment's record, not a deployable model: they are written
under the protocol's output folder and never into a bundle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from models.alignment import AlignmentLayer
from models.bundle_models import save_module
from runtime.preprocess import Preprocessing
from trainer.data import Sample
from trainer.train_task import TrainConfig, Trainee, train_epoch

#: The one task name of the naive model (a CASAM with a single forced layer).
NAIVE_TASK = "naive"


def initial_layer(config: TrainConfig, device: torch.device) -> AlignmentLayer:
    """The layer before task 1, seeded exactly as CA-SAM seeds each task's fresh layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AlignmentLayer().to(device)


def fine_tune(trainee: Trainee, embeddings: torch.Tensor, samples: Sequence[Sample], prep: Preprocessing,
              config: TrainConfig, desc: str, quiet: bool = True) -> list[dict[str, Any]]:
    """Continue training ``trainee.layer`` in place on one task; returns the per-epoch loss log.

    The caller gives a fresh Adam per task, as a new fine-tuning run started from the
    previous weights.
    """
    log: list[dict[str, Any]] = []
    bar = tqdm(total=config.epochs * len(samples), desc=desc, unit="img", disable=quiet, leave=False)
    for epoch in range(config.epochs):
        e0 = time.time()
        parts = train_epoch(trainee, embeddings, samples, prep, config, epoch, bar)
        log.append({"epoch": epoch + 1, **parts, "seconds": time.time() - e0})
    bar.close()
    trainee.layer.eval()
    return log


def stage_weights_path(out_dir: Path, stage: int, task: str) -> Path:
    """``<out>/naive/stage<t>_<task>.safetensors``: the layer after stage t (1-based)."""
    return out_dir / NAIVE_TASK / f"stage{stage}_{task}.safetensors"


def save_stage(layer: AlignmentLayer, out_dir: Path, stage: int, task: str) -> Path:
    path = stage_weights_path(out_dir, stage, task)
    save_module(layer, path)
    return path


def stage_summary(task: str, log: list[dict[str, Any]], path: Optional[Path], seconds: float) -> dict[str, Any]:
    return {"task": task, "epochs": len(log), "first_loss": log[0]["loss"] if log else None,
            "final_loss": log[-1]["loss"] if log else None, "weights": str(path) if path else None,
            "seconds": seconds}
