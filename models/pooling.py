"""Parameter-free attention pooling of an encoder map into one feature vector.

Positions with a large channel norm dominate, so the pooled vector describes the salient
content of the image rather than its (often empty) background. It is computed on the raw
encoder output, before any alignment, so every task's VAE sees the same feature.
"""

from __future__ import annotations

import torch

from models.errors import ShapeError


def attention_pool(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """B×C×H×W → B×C: ``s = ||Z[:,h,w]||₂ / C``, ``a = softmax(s / T)``, ``f = Σ a·Z``."""
    if z.ndim != 4:
        raise ShapeError(f"attention_pool expects B×C×H×W features, got shape {tuple(z.shape)}")
    b, c = z.shape[0], z.shape[1]
    flat = z.reshape(b, c, -1)  # B×C×HW
    saliency = torch.linalg.vector_norm(flat, dim=1) / c  # B×HW
    weights = torch.softmax(saliency / temperature, dim=-1)
    return torch.einsum("bcn,bn->bc", flat, weights)
