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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from casam_core.files import PathLike
from models.alignment import AlignmentLayer
from models.casam import CASAM
from models.prompt_decoder import PromptDecoder
from models.sam_loader import sam_preprocessing
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
from trainer.evaluate import EvalPass, evaluate_set
from trainer.losses import alignment_loss
from trainer.prompt_sampling import BOX_JITTER_PX, METHOD_FRAME, choose_structures, sample_prompts
from trainer.session import Session, SessionOptions, check_bundle_sam, open_session, resolve_device
from trainer.vae_training import VAEConfig

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
    # METHOD.md gives the jitter in the 1024 frame; a smaller frame (EfficientViT-SAM's 512)
    # scales it with the image, so a box moves by the same share of the object.
    coords, labels = sample_prompts(pick, use_boxes, rng, config.box_jitter * prep.size / METHOD_FRAME)
    return pick, coords, labels


@dataclass
class Trainee:
    """What one epoch updates and where: the layer (or its DDP wrapper), the frozen decoder,
    the optimiser and the device."""

    layer: torch.nn.Module
    decoder: PromptDecoder
    optimiser: torch.optim.Optimizer
    device: torch.device


def train_epoch(trainee: Trainee, embeddings: torch.Tensor, samples: Sequence[Sample], prep: Preprocessing,
                config: TrainConfig, epoch: int, bar: Optional[tqdm] = None, world: World = SINGLE) -> dict[str, float]:
    """One pass over the training images; returns the mean loss terms of the epoch.

    The alignment layer runs once per batch; each image's decoder pass and loss are then
    back-propagated one at a time into the aligned embeddings, and the accumulated gradient
    goes through the layer once. Same gradient, but only one image's frame-sized loss maps are
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
    trainee.layer.train()
    for start in range(0, len(order), config.batch_size):
        batch = order[start : start + config.batch_size]
        use_boxes = bool(rng.random() < 0.5)
        prompts = [draw_prompts(samples[i], prep, config, use_boxes, rng) for i in batch]
        _train_batch(trainee, embeddings, batch, prompts, world, totals)
        if bar is not None:
            bar.update(len(batch))
    totals = world.sum(totals)
    return {k: v / len(samples) for k, v in totals.items()}


def _train_batch(trainee: Trainee, embeddings: torch.Tensor, batch: np.ndarray, prompts: list[Prompts],
                 world: World, totals: dict[str, float]) -> None:
    """One optimiser step on this rank's share of ``batch`` (see ``train_epoch``)."""
    dev = trainee.device
    mine = world.share(len(batch))
    aligned = trainee.layer(embeddings[torch.from_numpy(batch[mine])].to(dev).float())
    held = aligned.detach().requires_grad_(True)
    for row, j in enumerate(mine):
        pick, coords, labels = prompts[j]
        low_res, iou_pred = trainee.decoder(held[row : row + 1], torch.from_numpy(coords).to(dev),
                                            torch.from_numpy(labels).to(dev))
        loss, parts = alignment_loss(low_res, iou_pred, torch.from_numpy(pick).to(dev).float())
        (loss / (len(batch) / world.size)).backward()
        totals["loss"] += float(loss.detach())
        for key, value in parts.items():
            totals[key] += value
    trainee.optimiser.zero_grad()
    aligned.backward(held.grad if held.grad is not None else torch.zeros_like(held))  # an empty share
    trainee.optimiser.step()


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


def _bundle_preprocessing(bundle: Optional[Bundle], sam: str, resize: Optional[str],
                          intensity: Optional[Intensity] = None) -> Preprocessing:
    """A new bundle's preprocessing (the SAM variant's input size, mean, std and resize rule,
    from the variant table), or the existing one's, refusing other settings: every task of a
    bundle shares one encoder input (resize and intensity handling)."""
    if bundle is not None:
        prep = bundle.preprocessing
        if resize is not None and resize != prep.resize:
            raise BundleError(f"bundle {bundle.root} uses resize mode {prep.resize!r}; it cannot take a task trained with {resize!r}")
        if intensity is not None and intensity != prep.intensity:
            raise BundleError(f"bundle {bundle.root} uses intensity {prep.intensity.to_dict()}; "
                              f"it cannot take a task trained with {intensity.to_dict()}")
        return prep
    return sam_preprocessing(sam, resize, intensity)


@dataclass(frozen=True)
class TaskOptions:
    """How one task is read, trained and committed, beside the SAM session and the config.

    ``axis`` slices volumes; ``intensity`` (casam_io.intensity) is recorded in a new bundle
    and must match an existing bundle's when given; ``wait`` is how long to wait for the
    bundle's write lock at the commit (0: fail at once); ``volume`` picks one volume of 4-D
    images."""

    resize: Optional[str] = None
    axis: int = 2
    intensity: Optional[Intensity] = None
    replace: bool = False
    resume: bool = False
    wait: float = DEFAULT_WAIT_S
    volume: Optional[int] = None  # picks one volume of 4-D images


@dataclass
class _Run:
    """The state one ``train_task`` call carries from stage to stage."""

    task: str
    root: Path
    bundle: Bundle
    dataset: Dataset
    session: Session
    prep: Preprocessing
    config: TrainConfig
    options: TaskOptions
    world: World
    seconds: dict[str, float]
    train_emb: Optional[torch.Tensor] = None  # set once the images are embedded
    test_emb: Optional[torch.Tensor] = None

    @property
    def staging(self) -> Path:
        return self.bundle.staging_dir(self.task)


def train_task(bundle_dir: PathLike, task: str, data: PathLike, *, session: SessionOptions = SessionOptions(),
               config: TrainConfig = TrainConfig(), options: TaskOptions = TaskOptions()) -> Optional[dict[str, Any]]:
    """Train ``task`` on ``data`` and commit it to the bundle; returns the JSON summary.

    Under torchrun, ranks other than 0 return None once rank 0 has committed.
    """
    started = time.time()
    run = _open_run(Path(bundle_dir), task, data, session, config, options)
    resumed_from, log, layer = _train_layer(run, _start_staging(run))
    if not run.world.is_main:
        run.world.finish()  # rank 0 alone calibrates, evaluates and commits
        return None
    record, metrics = _calibrate_and_stage(run, layer.eval(), log, resumed_from)
    run.bundle.commit_task(record, run.staging / "task", replace=options.replace, wait=options.wait)
    shutil.rmtree(run.staging, ignore_errors=True)
    run.world.finish()
    return _summary(run, record, log, resumed_from, metrics, time.time() - started)


def _open_run(root: Path, task: str, data: PathLike, session_options: SessionOptions, config: TrainConfig,
              options: TaskOptions) -> _Run:
    """Every cheap check first (name, config, bundle, data), then the SAM session and the bundle."""
    check_task_name(task)
    config.check()
    world = join(resolve_device(session_options.device))  # SINGLE unless launched by torchrun
    existing = Bundle.open(root, verify=False) if (root / "bundle.json").exists() else None
    prep = _bundle_preprocessing(existing, session_options.sam, options.resize, options.intensity)
    if existing is not None:
        existing.verify()
        check_bundle_sam(existing, session_options.sam)
        if task in existing.task_names and not options.replace:
            raise BundleError(f"task {task!r} already exists in {root}; pass --replace to retrain it")
    dataset = load_dataset(data, seed=config.seed, axis=options.axis, intensity=prep.intensity, volume=options.volume)
    check_dataset_size(dataset, config.folds)  # before any embedding or training
    session = open_session(session_options, prep)
    if existing is not None:
        check_bundle_sam(existing, session.sam.name, session.checkpoint_sha256)
        bundle = existing
    else:
        bundle = world.main_first(
            lambda: Bundle.create(root, session.sam.name, session.checkpoint_sha256, prep,
                                  untrained_sam=session.sam.untrained, wait=options.wait),
            lambda: Bundle.open(root, verify=False))
    return _Run(task, root, bundle, dataset, session, prep, config, options, world, {})


def _start_staging(run: _Run) -> Optional[dict[str, Any]]:
    """Check or reset the staging folder; returns the resume state to continue from, if any."""
    staging, fingerprint = run.staging, _run_fingerprint(run.config, run.dataset, run.session, run.prep)
    if run.options.resume and (staging / STATE_FILE).is_file():
        if read_json(staging / STATE_FILE) != json.loads(json.dumps(fingerprint)):
            raise BundleError(f"the interrupted run of task {run.task!r} used other data or settings; "
                              "rerun without --resume to start over")
        if (staging / RESUME_FILE).is_file():
            return torch.load(staging / RESUME_FILE, map_location=run.session.device, weights_only=True)
        return None
    run.world.main_first(lambda: _reset_staging(staging, fingerprint), lambda: None)
    return None


def _train_layer(run: _Run, state: Optional[dict[str, Any]]) -> tuple[int, list[dict[str, Any]], AlignmentLayer]:
    """Embed (through the cache) and train the alignment layer; (resumed epoch, log, layer)."""
    t0 = time.time()
    embeddings = run.session.cache.embeddings(run.dataset.samples, desc=f"embedding {run.task}", world=run.world)
    run.seconds["embedding"] = time.time() - t0
    run.train_emb, run.test_emb = embeddings[: len(run.dataset.train)], embeddings[len(run.dataset.train):]
    dev, config = run.session.device, run.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        layer = AlignmentLayer().to(dev)
    optimiser = torch.optim.Adam(layer.parameters(), lr=config.lr)
    resumed_from, log = 0, []
    if state is not None:
        layer.load_state_dict(state["layer"])
        optimiser.load_state_dict(state["optimiser"])
        resumed_from, log = int(state["epoch"]), json.loads(state["log"])
    # DistributedDataParallel under torchrun, else the layer itself
    trainee = Trainee(run.world.wrap(layer), PromptDecoder(run.session.sam.model).to(dev), optimiser, dev)
    t0 = time.time()
    bar = tqdm(total=(config.epochs - resumed_from) * len(run.dataset.train), desc=f"training {run.task}", unit="img",
               disable=run.session.cache.quiet or not run.world.is_main)
    for epoch in range(resumed_from, config.epochs):
        e0 = time.time()
        parts = train_epoch(trainee, run.train_emb, run.dataset.train, run.prep, config, epoch, bar, run.world)
        log.append({"epoch": epoch + 1, **parts, "seconds": time.time() - e0})
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if run.world.is_main:
            _save_resume(run.staging / RESUME_FILE, layer, optimiser, epoch + 1, log)
    bar.close()
    run.seconds["alignment"] = time.time() - t0
    return resumed_from, log, layer


def _calibrate_and_stage(run: _Run, layer: AlignmentLayer, log: list[dict[str, Any]],
                         resumed_from: int) -> tuple[TaskRecord, dict[str, Any]]:
    """VAE + threshold, held-out metrics, and every task file written into the staging folder."""
    t0, config, staged = time.time(), run.config, run.staging / "task"
    pooled = attention_pool(run.train_emb.float(), run.bundle.temperature)
    vae, calibration = calibrate(pooled, config.vae(), config.folds, config.percentile, train_seed=config.seed)
    key = threshold_key(config.percentile)
    threshold = float(calibration[key])
    run.seconds["vae_and_calibration"] = time.time() - t0
    model = build_model(run.bundle, run.session.sam.model, candidate=(run.task, layer.cpu(), vae, threshold))
    metrics = task_metrics(model.to(run.session.device), run.dataset, run.test_emb, run.prep, run.task,
                           run.session.cache.quiet)
    metrics.update({"n_train": len(run.dataset.train), "n_test": len(run.dataset.test),
                    "skipped_empty": len(run.dataset.skipped_empty)})
    save_module(layer, staged / "alignment.safetensors")
    save_module(vae, staged / "vae.safetensors")
    atomic_write_json(staged / "calibration.json", calibration)
    atomic_write_json(staged / "split.json", run.dataset.split_record())
    atomic_write_json(staged / "train_log.json", {"epochs": log, "resumed_from_epoch": resumed_from,
                                                  "seconds": dict(run.seconds)})
    record = TaskRecord(
        name=run.task, files={}, alignment={"num_blocks": len(layer.layers), "dim": layer.dim},
        vae={"in_dim": vae.in_dim, "latent_dim": vae.latent_dim, "hidden_dim": vae.hidden_dim, "beta": vae.beta},
        threshold_key=key, threshold=threshold,
        hyperparameters={**asdict(config), "resize": run.prep.resize, "data": str(run.dataset.root),
                         "split": run.dataset.split_source},
        metrics=metrics,
    )
    return record, metrics


def _summary(run: _Run, record: TaskRecord, log: list[dict[str, Any]], resumed_from: int, metrics: dict[str, Any],
             total: float) -> dict[str, Any]:
    """The JSON summary casam-train prints."""
    cache = run.session.cache
    summary = {
        "task": run.task, "bundle": str(run.root), "tasks": run.bundle.task_names, "threshold_key": record.threshold_key,
        "threshold": record.threshold, "epochs": run.config.epochs, "resumed_from_epoch": resumed_from,
        "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
        "metrics": metrics, "device": str(run.session.device),
        "embedding_cache": {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses},
        "seconds": {**run.seconds, "total": total},
    }
    if run.world.parallel:
        summary["data_parallel"] = {"processes": run.world.size, "backend": run.world.backend}
    return summary


def task_metrics(model: CASAM, dataset: Dataset, test_emb: torch.Tensor, prep: Preprocessing, task: str, quiet: bool) -> dict[str, Any]:
    """Held-out scores recorded in bundle.json: the task's own layer, plain SAM, and routing."""
    if not dataset.test:
        return {"test_iou": None, "test_biou": None, "identity_iou": None, "identity_biou": None, "routing_accuracy": None}
    memo: dict[tuple[int, int], tuple[float, float]] = {}  # the routed pass reuses both forced passes
    own = evaluate_set(model, test_emb, dataset.test, prep, task, EvalPass(task=task, memo=memo), quiet)
    plain = evaluate_set(model, test_emb, dataset.test, prep, task, EvalPass(task=IDENTITY, memo=memo), quiet)
    routed = evaluate_set(model, test_emb, dataset.test, prep, task, EvalPass(expected=task, memo=memo), quiet)
    return {"test_iou": own.iou, "test_biou": own.biou, "identity_iou": plain.iou, "identity_biou": plain.biou,
            "routed_iou": routed.iou, "routed_biou": routed.biou, "routing_accuracy": routed.routing_accuracy}
