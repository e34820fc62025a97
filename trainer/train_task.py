"""Adding one task to a bundle: alignment layer, VAE, threshold, metrics, then one commit.

Everything is built in the bundle's private staging folder and moved into ``tasks/`` in a
single rename by ``Bundle.commit_task``; until then the bundle is exactly what it was, so
a kill at any moment is harmless. Each finished epoch leaves a resume checkpoint in the
staging folder, so ``resume=True`` continues an interrupted task where it stopped. Only
the new task's data is read, and earlier tasks' files are never opened for writing.

Under torchrun (``trainer/distributed.py``) the same function runs on every rank: the
ranks share the embedding cache fill and the alignment-layer steps, and rank 0 alone
writes to the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from models.alignment import AlignmentLayer
from models.casam import CASAM
from models.prompt_decoder import PromptDecoder
from models.sam_loader import FrozenSam
from models.pooling import attention_pool
from casam_core.names import IDENTITY
from casam_core.files import atomic_path, atomic_write_json, read_json
from casam_io.intensity import Intensity
from runtime.preprocess import Preprocessing, frame_for, resize_mask_to_frame
from casam_bundle import DEFAULT_WAIT_S, Bundle, BundleError, TaskRecord, check_task_name
from models.bundle_models import build_model, save_module
from trainer.calibration import calibrate, threshold_key
from trainer.data import Dataset, Sample, load_dataset
from trainer.distributed import SINGLE, World, join
from trainer.preconditions import check_dataset_size
from trainer.evaluate import evaluate_set
from trainer.losses import alignment_loss
from trainer.prompt_sampling import BOX_JITTER_PX, choose_structures, sample_prompts
from trainer.session import Session, check_bundle_sam, open_session, resolve_device
from trainer.vae_training import VAEConfig

PathLike = Union[str, os.PathLike]
RESUME_FILE = "resume.pt"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class TrainConfig:
    """Every METHOD.md hyperparameter of one task; recorded in bundle.json."""

    epochs: int = 24
    batch_size: int = 6
    lr: float = 1e-4
    masks_per_image: int = 5
    vae_epochs: int = 10
    vae_lr: float = 5e-4
    beta: float = 16.5
    folds: int = 5
    percentile: float = 97.0
    seed: int = 0
    box_jitter: float = BOX_JITTER_PX

    def vae(self) -> VAEConfig:
        return VAEConfig(epochs=self.vae_epochs, lr=self.vae_lr, batch_size=self.batch_size, beta=self.beta)

    def check(self) -> None:
        from casam_core.errors import InputError

        for name in ("epochs", "batch_size", "masks_per_image", "vae_epochs", "folds"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.folds < 2:
            raise InputError(f"folds must be at least 2, got {self.folds}")
        if not 0 < self.percentile <= 100:
            raise InputError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.lr <= 0 or self.vae_lr <= 0:
            raise InputError("learning rates must be positive")


def frame_structures(sample: Sample, prep: Preprocessing) -> np.ndarray:
    """The sample's structures in the size×size model frame (those that survive resizing)."""
    index = sample.index_map()
    frame = frame_for(index.shape[0], index.shape[1], prep)
    resized = resize_mask_to_frame(index, frame)
    masks = resized[None] == np.arange(1, int(index.max()) + 1, dtype=resized.dtype)[:, None, None]
    return masks[masks.reshape(len(masks), -1).any(axis=1)]


Prompts = tuple[np.ndarray, np.ndarray, np.ndarray]  # target masks, point coords, point labels


def draw_prompts(sample: Sample, prep: Preprocessing, config: TrainConfig, use_boxes: bool,
                 rng: np.random.Generator) -> Prompts:
    """One image's training targets and prompts for one step."""
    masks = frame_structures(sample, prep)
    pick = masks[choose_structures(len(masks), config.masks_per_image, rng)]
    coords, labels = sample_prompts(pick, use_boxes, rng, config.box_jitter)
    return pick, coords, labels


def train_epoch(layer: torch.nn.Module, decoder: PromptDecoder, optimiser: torch.optim.Optimizer,
                embeddings: torch.Tensor, samples: Sequence[Sample], prep: Preprocessing,
                config: TrainConfig, epoch: int, device: torch.device, bar: Optional[tqdm] = None,
                world: World = SINGLE) -> dict[str, float]:
    """One pass over the training images; returns the mean loss terms of the epoch.

    The alignment layer runs once per batch; each image's decoder pass and loss are then
    back-propagated one at a time into the aligned embeddings, and the accumulated gradient
    goes through the layer once. Same gradient, but only one image's 1024² loss maps are
    ever held in memory.

    Under torchrun ``layer`` is wrapped in DistributedDataParallel. Every rank draws the
    prompts of the whole global batch, so the random stream is the one a single process
    draws, but runs the layer, decoder and loss on its share of the batch only. Each loss
    is divided by len(batch)/ranks, and DDP averages the gradients over the ranks: the
    step is the one a single process takes, up to the order of the float32 sums.
    """
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(samples))
    totals = {"loss": 0.0, "focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
    layer.train()
    for start in range(0, len(order), config.batch_size):
        batch = order[start : start + config.batch_size]
        use_boxes = bool(rng.random() < 0.5)
        prompts = [draw_prompts(samples[i], prep, config, use_boxes, rng) for i in batch]
        mine = world.share(len(batch))
        aligned = layer(embeddings[torch.from_numpy(batch[mine])].to(device).float())
        held = aligned.detach().requires_grad_(True)
        for row, j in enumerate(mine):
            pick, coords, labels = prompts[j]
            low_res, iou_pred = decoder(held[row : row + 1], torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device))
            loss, parts = alignment_loss(low_res, iou_pred, torch.from_numpy(pick).to(device).float())
            (loss / (len(batch) / world.size)).backward()
            totals["loss"] += float(loss.detach())
            for key, value in parts.items():
                totals[key] += value
        optimiser.zero_grad()
        aligned.backward(held.grad if held.grad is not None else torch.zeros_like(held))  # an empty share
        optimiser.step()
        if bar is not None:
            bar.update(len(batch))
    totals = world.sum(totals)
    return {k: v / len(samples) for k, v in totals.items()}


def _save_resume(path: Path, layer: AlignmentLayer, optimiser: torch.optim.Optimizer, epoch: int, log: list) -> None:
    state = {"epoch": epoch, "layer": layer.state_dict(), "optimiser": optimiser.state_dict(), "log": json.dumps(log)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _run_fingerprint(config: TrainConfig, dataset: Dataset, session: Session, prep: Preprocessing) -> dict[str, Any]:
    """What an interrupted run must share with its resumption to be continued."""
    return {
        "config": asdict(config),
        "sam": {"model": session.sam.name, "checkpoint_sha256": session.checkpoint_sha256},
        "preprocessing": prep.to_dict(),
        "train": [[s.stem, s.image_hash] for s in dataset.train],
        "test": [[s.stem, s.image_hash] for s in dataset.test],
    }


def _reset_staging(staging: Path, fingerprint: dict[str, Any]) -> None:
    """A fresh staging folder for a run that starts from epoch 0."""
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "task").mkdir(parents=True)
    atomic_write_json(staging / STATE_FILE, fingerprint)


def _bundle_preprocessing(bundle: Optional[Bundle], resize: Optional[str],
                          intensity: Optional[Intensity] = None) -> Preprocessing:
    """A new bundle's preprocessing, or the existing one's, refusing other settings: every
    task of a bundle shares one encoder input (resize and intensity handling)."""
    if bundle is not None:
        prep = bundle.preprocessing
        if resize is not None and resize != prep.resize:
            raise BundleError(f"bundle {bundle.root} uses resize mode {prep.resize!r}; it cannot take a task trained with {resize!r}")
        if intensity is not None and intensity != prep.intensity:
            raise BundleError(f"bundle {bundle.root} uses intensity {prep.intensity.to_dict()}; "
                              f"it cannot take a task trained with {intensity.to_dict()}")
        return prep
    return Preprocessing(resize=resize or "longest", intensity=intensity or Intensity())


def train_task(
    bundle_dir: PathLike,
    task: str,
    data: PathLike,
    *,
    sam: str = "vit_b",
    checkpoint: Optional[PathLike] = None,
    config: TrainConfig = TrainConfig(),
    resize: Optional[str] = None,
    device: str = "auto",
    replace: bool = False,
    resume: bool = False,
    cache_dir: Optional[PathLike] = None,
    quiet: bool = False,
    frozen_sam: Optional[FrozenSam] = None,
    wait: float = DEFAULT_WAIT_S,
    axis: int = 2,
    intensity: Optional[Intensity] = None,
    volume: Optional[int] = None,
) -> Optional[dict[str, Any]]:
    """Train ``task`` on ``data`` and commit it to the bundle; returns the JSON summary.

    Under torchrun, ranks other than 0 return None once rank 0 has committed.
    ``wait``: seconds to wait for the bundle's write lock at the commit (0: fail at once).
    ``axis`` slices volumes; ``intensity`` (casam_io.intensity) is recorded in a new bundle,
    and must match an existing bundle's when given. ``volume`` picks one volume of 4-D images.
    """
    started = time.time()
    check_task_name(task)
    config.check()
    world = join(resolve_device(device))  # SINGLE unless launched by torchrun
    root = Path(bundle_dir)
    existing = Bundle.open(root, verify=False) if (root / "bundle.json").exists() else None
    prep = _bundle_preprocessing(existing, resize, intensity)
    if existing is not None:
        existing.verify()
        check_bundle_sam(existing, sam)
        if task in existing.task_names and not replace:
            raise BundleError(f"task {task!r} already exists in {root}; pass --replace to retrain it")
    dataset = load_dataset(data, seed=config.seed, axis=axis, intensity=prep.intensity, volume=volume)
    check_dataset_size(dataset, config.folds)  # before any embedding or training
    session = open_session(sam, checkpoint, prep, device, cache_dir, quiet, frozen_sam)
    if existing is not None:
        check_bundle_sam(existing, session.sam.name, session.checkpoint_sha256)
        bundle = existing
    else:
        bundle = world.main_first(
            lambda: Bundle.create(root, session.sam.name, session.checkpoint_sha256, prep,
                                  untrained_sam=session.sam.untrained, wait=wait),
            lambda: Bundle.open(root, verify=False))

    staging = bundle.staging_dir(task)
    staged_task = staging / "task"
    fingerprint = _run_fingerprint(config, dataset, session, prep)
    resumed_from = 0
    if resume and (staging / STATE_FILE).is_file():
        if read_json(staging / STATE_FILE) != json.loads(json.dumps(fingerprint)):
            raise BundleError(
                f"the interrupted run of task {task!r} used other data or settings; rerun without --resume to start over"
            )
    else:
        world.main_first(lambda: _reset_staging(staging, fingerprint), lambda: None)

    t0 = time.time()
    embeddings = session.cache.embeddings(dataset.samples, desc=f"embedding {task}", world=world)
    embed_seconds = time.time() - t0
    n_train = len(dataset.train)
    train_emb, test_emb = embeddings[:n_train], embeddings[n_train:]

    dev = session.device
    decoder = PromptDecoder(session.sam.model).to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        layer = AlignmentLayer().to(dev)
    optimiser = torch.optim.Adam(layer.parameters(), lr=config.lr)
    log: list[dict[str, Any]] = []
    if resume and (staging / RESUME_FILE).is_file():
        state = torch.load(staging / RESUME_FILE, map_location=dev, weights_only=True)
        layer.load_state_dict(state["layer"])
        optimiser.load_state_dict(state["optimiser"])
        resumed_from = int(state["epoch"])
        log = json.loads(state["log"])
    model = world.wrap(layer)  # DistributedDataParallel under torchrun, else the layer itself

    t0 = time.time()
    bar = tqdm(total=(config.epochs - resumed_from) * n_train, desc=f"training {task}", unit="img",
               disable=quiet or not world.is_main)
    for epoch in range(resumed_from, config.epochs):
        e0 = time.time()
        parts = train_epoch(model, decoder, optimiser, train_emb, dataset.train, prep, config, epoch, dev, bar, world)
        log.append({"epoch": epoch + 1, **parts, "seconds": time.time() - e0})
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if world.is_main:
            _save_resume(staging / RESUME_FILE, layer, optimiser, epoch + 1, log)
    bar.close()
    train_seconds = time.time() - t0
    if not world.is_main:
        world.finish()  # rank 0 alone calibrates, evaluates and commits
        return None
    layer = layer.eval()

    t0 = time.time()
    pooled = attention_pool(train_emb.float(), bundle.temperature)
    vae, calibration = calibrate(pooled, config.vae(), config.folds, config.percentile, train_seed=config.seed)
    key = threshold_key(config.percentile)
    threshold = float(calibration[key])
    vae_seconds = time.time() - t0

    metrics = task_metrics(build_model(bundle, session.sam.model, candidate=(task, layer.cpu(), vae, threshold)).to(dev),
                           dataset, test_emb, prep, task, quiet)
    metrics.update({"n_train": n_train, "n_test": len(dataset.test), "skipped_empty": len(dataset.skipped_empty)})

    save_module(layer, staged_task / "alignment.safetensors")
    save_module(vae, staged_task / "vae.safetensors")
    atomic_write_json(staged_task / "calibration.json", calibration)
    atomic_write_json(staged_task / "split.json", dataset.split_record())
    atomic_write_json(staged_task / "train_log.json", {
        "epochs": log, "resumed_from_epoch": resumed_from,
        "seconds": {"embedding": embed_seconds, "alignment": train_seconds, "vae_and_calibration": vae_seconds},
    })
    record = TaskRecord(
        name=task, files={}, alignment={"num_blocks": len(layer.layers), "dim": layer.dim},
        vae={"in_dim": vae.in_dim, "latent_dim": vae.latent_dim, "hidden_dim": vae.hidden_dim, "beta": vae.beta},
        threshold_key=key, threshold=threshold,
        hyperparameters={**asdict(config), "resize": prep.resize, "data": str(dataset.root), "split": dataset.split_source},
        metrics=metrics,
    )
    bundle.commit_task(record, staged_task, replace=replace, wait=wait)
    shutil.rmtree(staging, ignore_errors=True)
    world.finish()
    summary = {
        "task": task, "bundle": str(root), "tasks": bundle.task_names, "threshold_key": key, "threshold": threshold,
        "epochs": config.epochs, "resumed_from_epoch": resumed_from,
        "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
        "metrics": metrics, "device": str(dev),
        "embedding_cache": {"dir": str(session.cache.root), "hits": session.cache.hits, "misses": session.cache.misses},
        "seconds": {"embedding": embed_seconds, "alignment": train_seconds, "vae_and_calibration": vae_seconds,
                    "total": time.time() - started},
    }
    if world.parallel:
        summary["data_parallel"] = {"processes": world.size, "backend": world.backend}
    return summary


def task_metrics(model: CASAM, dataset: Dataset, test_emb: torch.Tensor, prep: Preprocessing, task: str, quiet: bool) -> dict[str, Any]:
    """Held-out scores recorded in bundle.json: the task's own layer, plain SAM, and routing."""
    if not dataset.test:
        return {"test_iou": None, "test_biou": None, "identity_iou": None, "identity_biou": None, "routing_accuracy": None}
    memo: dict[tuple[int, int], tuple[float, float]] = {}  # the routed pass reuses both forced passes
    own = evaluate_set(model, test_emb, dataset.test, prep, task, task=task, quiet=quiet, memo=memo)
    plain = evaluate_set(model, test_emb, dataset.test, prep, task, task=IDENTITY, quiet=quiet, memo=memo)
    routed = evaluate_set(model, test_emb, dataset.test, prep, task, expected=task, quiet=quiet, memo=memo)
    return {"test_iou": own.iou, "test_biou": own.biou, "identity_iou": plain.iou, "identity_biou": plain.biou,
            "routed_iou": routed.iou, "routed_biou": routed.biou, "routing_accuracy": routed.routing_accuracy}
