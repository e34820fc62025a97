"""Training one task VAE on pooled encoder features (METHOD.md: Adam 5e-4, 10 epochs, batch 6).

Seeds fix the initial weights, the shuffling and the reparameterisation noise, so the
same features always give the same VAE and therefore the same threshold.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from models.vae import DEFAULT_BETA, TaskVAE


@dataclass(frozen=True)
class VAEConfig:
    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 6
    beta: float = DEFAULT_BETA
    latent_dim: int = 64
    hidden_dim: int = 128


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny matmuls on one CPU thread: with a 256→128→64 MLP, thread hand-offs cost
    far more than the arithmetic (measured 25× slower on two busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_vae(features: torch.Tensor, config: VAEConfig, seed: int) -> TaskVAE:
    """A fresh VAE fitted to N×256 features by minimising the mean sampled score."""
    with single_thread():
        return _fit(features.detach().float().cpu(), config, seed)


def _fit(f: torch.Tensor, config: VAEConfig, seed: int) -> TaskVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = TaskVAE(f.shape[1], config.latent_dim, config.hidden_dim, config.beta)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(vae.parameters(), lr=config.lr)
    vae.train()
    for _ in range(config.epochs):
        order = torch.randperm(f.shape[0], generator=generator)
        for start in range(0, f.shape[0], config.batch_size):
            batch = f[order[start : start + config.batch_size]]
            loss = vae.training_loss(batch, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return vae.eval()


@torch.no_grad()
def vae_scores(vae: TaskVAE, features: torch.Tensor) -> torch.Tensor:
    """Deterministic (z = μ) scores, the ones routing compares with τ."""
    return vae.score(features.detach().float().cpu())
