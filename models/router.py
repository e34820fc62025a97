"""ELBO routing over all tasks in one vectorised pass.

The tasks' VAEs are stacked into N×… weight tensors, so scoring N tasks is one chain of
batched matmuls instead of N module calls: at 100 tasks the router stays a rounding error
next to the encoder. This module is the graph that the export writes as the "VAE scorers";
thresholds are kept out of the exported graph so they can be retuned without re-export.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ShapeError
from models.pooling import attention_pool
from models.vae import TaskVAE

#: The router's index for the identity route (plain SAM); its name is casam_core.names.IDENTITY.
IDENTITY_INDEX = -1


class StackedVAEScorer(nn.Module):
    """N TaskVAEs as stacked tensors; ``forward(f) → B×N`` deterministic scores."""

    def __init__(self, vaes: Sequence[TaskVAE]) -> None:
        super().__init__()
        dims = {(v.in_dim, v.latent_dim, v.hidden_dim) for v in vaes}
        if len(dims) > 1:
            raise ShapeError(f"all task VAEs must share their dimensions, got {sorted(dims)}")
        self.in_dim = vaes[0].in_dim if vaes else 256

        def stack(get) -> nn.Parameter:
            return nn.Parameter(torch.stack([get(v).detach().clone() for v in vaes]), requires_grad=False)

        self.num_tasks = len(vaes)
        if vaes:
            self.enc_w, self.enc_b = stack(lambda v: v.encoder[0].weight), stack(lambda v: v.encoder[0].bias)
            self.mu_w, self.mu_b = stack(lambda v: v.fc_mu.weight), stack(lambda v: v.fc_mu.bias)
            self.lv_w, self.lv_b = stack(lambda v: v.fc_logvar.weight), stack(lambda v: v.fc_logvar.bias)
            self.d1_w, self.d1_b = stack(lambda v: v.decoder[0].weight), stack(lambda v: v.decoder[0].bias)
            self.d2_w, self.d2_b = stack(lambda v: v.decoder[2].weight), stack(lambda v: v.decoder[2].bias)
        self.register_buffer("beta", torch.tensor([v.beta for v in vaes], dtype=torch.float32))

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # x: N×B×I, w: N×O×I, b: N×O  →  N×B×O. A batched MatMul rather than einsum: ONNX
        # Runtime executes Einsum several times slower, and this graph is the exported router.
        return torch.matmul(x, w.transpose(1, 2)) + b.unsqueeze(1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim != 2 or f.shape[1] != self.in_dim:
            raise ShapeError(f"router expects B×{self.in_dim} pooled features, got shape {tuple(f.shape)}")
        if self.num_tasks == 0:
            return f.new_zeros((f.shape[0], 0))
        x = f.unsqueeze(0).expand(self.num_tasks, -1, -1)  # N×B×256
        h = F.gelu(self._linear(x, self.enc_w, self.enc_b))
        mu = self._linear(h, self.mu_w, self.mu_b)
        logvar = self._linear(h, self.lv_w, self.lv_b)
        recon = self._linear(F.gelu(self._linear(mu, self.d1_w, self.d1_b)), self.d2_w, self.d2_b)
        rec = (recon - x).pow(2).mean(dim=-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)
        return (rec + self.beta.unsqueeze(1) * kl).transpose(0, 1)  # B×N


class Router(nn.Module):
    """Raw encoder embeddings → (pooled feature B×256, scores B×N)."""

    def __init__(self, vaes: Sequence[TaskVAE], temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.scorer = StackedVAEScorer(vaes)

    @property
    def num_tasks(self) -> int:
        return self.scorer.num_tasks

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if embeddings.ndim != 4 or embeddings.shape[1] != self.scorer.in_dim:
            raise ShapeError(
                f"router expects B×{self.scorer.in_dim}×H×W embeddings, got shape {tuple(embeddings.shape)}"
            )
        pooled = attention_pool(embeddings, self.temperature)
        return pooled, self.scorer(pooled)


def choose_routes(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Argmin task per row if its score is within its threshold, else ``IDENTITY_INDEX`` (-1).

    ``torch.argmin`` returns the first minimum, so ties go to the lower task index.
    """
    if scores.shape[1] == 0:
        return torch.full((scores.shape[0],), IDENTITY_INDEX, dtype=torch.long, device=scores.device)
    best = torch.argmin(scores, dim=1)
    best_score = scores.gather(1, best[:, None])[:, 0]
    accepted = best_score <= thresholds.to(scores.device)[best]
    return torch.where(accepted, best, torch.full_like(best, IDENTITY_INDEX))
