"""K-fold threshold calibration of a task's VAE (METHOD.md).

τ must describe how a task's VAE scores images it has *not* seen, since that is what
routing faces at inference; scores on the VAE's own training data would be optimistic. So
each fold's images are scored by a fresh VAE trained on the other folds, the held-out
scores are pooled, and their percentiles become the candidate thresholds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.vae import TaskVAE
from trainer.vae_training import VAEConfig, train_vae, vae_scores

CALIBRATION_SEED = 2025
PERCENTILES = {"p95": 95.0, "p97": 97.0, "p99": 99.0}


def fold_indices(n: int, folds: int, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """np.random.RandomState(seed).permutation(n), then np.array_split into ``folds``."""
    return [f for f in np.array_split(np.random.RandomState(seed).permutation(n), folds) if len(f)]


def calibrate(features: torch.Tensor, config: VAEConfig, folds: int = 5, percentile: float = 97.0,
              seed: int = CALIBRATION_SEED, train_seed: int = 0) -> tuple[TaskVAE, dict[str, Any]]:
    """(final VAE trained on all features, calibration.json content).

    Needs at least two images: every fold must leave some data to train on.
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"calibration needs at least 2 training images, got {n}")
    k = min(folds, n)
    held_out = np.empty(n, np.float64)
    for i, test_idx in enumerate(fold_indices(n, k, seed)):
        train_idx = np.setdiff1d(np.arange(n), test_idx)
        vae = train_vae(features[torch.from_numpy(train_idx)], config, seed=train_seed * 1000 + i + 1)
        held_out[test_idx] = vae_scores(vae, features[torch.from_numpy(test_idx)]).double().numpy()
    final = train_vae(features, config, seed=train_seed * 1000)
    mean, std = float(held_out.mean()), float(held_out.std())
    record: dict[str, Any] = {"folds": k, "seed": seed, "percentile": percentile, "count": n, "mean": mean, "std": std}
    record.update({key: float(np.percentile(held_out, q)) for key, q in PERCENTILES.items()})
    record["mean_plus_2std"] = mean + 2 * std
    record[threshold_key(percentile)] = float(np.percentile(held_out, percentile))
    record["scores"] = held_out.tolist()
    return final, record


def threshold_key(percentile: float) -> str:
    return f"p{percentile:g}"
