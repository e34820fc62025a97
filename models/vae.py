"""Per-task VAE over pooled encoder features; its ELBO-style score is the routing signal.

A task's VAE reconstructs features of its own images well and others poorly, so a low
score means "this image looks like task t". Scoring uses z = μ (our deliberate
deviation from the authors' sampled z) so that routing is reproducible and the exported
graph equals the PyTorch one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ShapeError

DEFAULT_BETA = 16.5


class TaskVAE(nn.Module):
    def __init__(self, in_dim: int = 256, latent_dim: int = 64, hidden_dim: int = 128, beta: float = DEFAULT_BETA) -> None:
        super().__init__()
        self.in_dim, self.latent_dim, self.hidden_dim = in_dim, latent_dim, hidden_dim
        self.beta = float(beta)
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, in_dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _check(self, f: torch.Tensor) -> None:
        if f.ndim != 2 or f.shape[1] != self.in_dim:
            raise ShapeError(f"TaskVAE expects B×{self.in_dim} pooled features, got shape {tuple(f.shape)}")

    def encode(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(f)
        h = self.encoder(f)
        return self.fc_mu(h), self.fc_logvar(h)

    def score_terms(self, f: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        recon = self.decoder(z)
        rec = F.mse_loss(recon, f, reduction="none").mean(dim=1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return rec + self.beta * kl

    def score(self, f: torch.Tensor) -> torch.Tensor:
        """Deterministic per-sample score (z = μ): used for calibration and routing."""
        mu, logvar = self.encode(f)
        return self.score_terms(f, mu, mu, logvar)

    def training_loss(self, f: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean score with the reparameterised sample z = μ + σ·ε, for training."""
        mu, logvar = self.encode(f)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.score_terms(f, z, mu, logvar).mean()
