"""Shared fixtures: the tiny seeded SAM and a valid bundle built without the trainer.

The random bundle holds seeded, untrained alignment layers and VAEs in exactly the bundle
format, so export and runtime tests exercise real graphs without paying for training.
Tests that need trained behaviour train their own tasks through ``trainer``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on the 2-core CI machine) each worker gets
# one torch thread: two workers × two threads on two cores only adds contention.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REAL_DATA = Path(os.environ.get("CASAM_REAL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real")).resolve()


def real_data_or_skip(*names: str) -> Path:
    """The real data folder, or a clean skip when ../shared/data/real is absent."""
    for name in names or ("",):
        if not (REAL_DATA / name).is_dir():
            pytest.skip(f"real data not found at {REAL_DATA / name}")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_sam():
    from models.sam_loader import load_frozen_sam

    return load_frozen_sam("tiny")


def make_random_bundle(
    root: Path,
    names: Sequence[str] = ("alpha", "beta"),
    seed: int = 0,
    thresholds: Optional[Sequence[float]] = None,
    resize: str = "longest",
    intensity=None,
):
    """A valid bundle of seeded, untrained tasks (format-exact, no training); ``intensity``
    (casam_io.intensity.Intensity) is recorded in its preprocessing (default: auto)."""
    from models.alignment import AlignmentLayer
    from models.sam_loader import TINY_CHECKPOINT_SHA
    from models.vae import TaskVAE
    from casam_core.files import atomic_write_json
    from runtime.preprocess import Preprocessing
    from casam_bundle import Bundle, TaskRecord
    from models.bundle_models import save_module

    prep = Preprocessing(resize=resize) if intensity is None else Preprocessing(resize=resize, intensity=intensity)
    bundle = Bundle.create(root, "tiny", TINY_CHECKPOINT_SHA.format(seed=0), prep, untrained_sam=True)
    for i, name in enumerate(names):
        torch.manual_seed(seed * 100 + i)
        staged = bundle.staging_dir(name)
        staged.mkdir(parents=True, exist_ok=True)
        layer = AlignmentLayer()
        # Untrained layers are near-identity maps; perturb them so that routing matters.
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_module(layer, staged / "alignment.safetensors")
        save_module(TaskVAE(), staged / "vae.safetensors")
        tau = float(thresholds[i]) if thresholds is not None else 1e6
        # Held-out scores all equal to τ: every recorded percentile reproduces τ exactly, so
        # the bundle passes the calibration check of task packages.
        calib = {"folds": 5, "seed": 2025, "percentile": 97, "count": 5, "mean": tau, "std": 0.0,
                 "p95": tau, "p97": tau, "p99": tau, "mean_plus_2std": tau, "scores": [tau] * 5}
        atomic_write_json(staged / "calibration.json", calib)
        atomic_write_json(staged / "split.json", {"train": [], "test": [], "seed": seed})
        atomic_write_json(staged / "train_log.json", {"epochs": [], "note": "random test bundle, untrained"})
        record = TaskRecord(name=name, files={}, alignment={"num_blocks": 3, "dim": 256},
                            vae={"in_dim": 256, "latent_dim": 64, "hidden_dim": 128, "beta": 16.5},
                            threshold_key="p97", threshold=tau)
        bundle.commit_task(record, staged)
    return bundle


@pytest.fixture
def random_bundle(tmp_path):
    return make_random_bundle(tmp_path / "bundle")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
