"""EfficientViT's attention block: multi-scale ReLU linear attention (LiteMLA) and the
MBConv that follows it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.efficientvit_layers import ConvLayer, Local, MBConv, Residual

#: Added to the linear attention's normaliser, as upstream, so an all-zero key row cannot divide by 0.
EPS = 1e-15


class LiteMLA(nn.Module):
    """Q, K, V from a 1×1 conv plus a 5×5-aggregated copy (two scales); per head,
    out = V·(KᵀQ) / (1ᵀ·KᵀQ) with ReLU kernels on Q and K: linear in the token count.

    ``(V;1)·Kᵀ`` is formed first (d+1 × d per head) and then applied to Q, so no N×N map
    exists. That is the same quantity as the quadratic form upstream switches to on tiny
    grids, computed in the other order.
    """

    def __init__(self, channels: int, head_dim: int, scale: int = 5) -> None:
        super().__init__()
        self.dim = head_dim
        heads = channels // head_dim
        total = heads * head_dim
        self.qkv = ConvLayer(channels, 3 * total, 1, norm=False)
        self.aggreg = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3 * total, 3 * total, scale, padding=scale // 2, groups=3 * total, bias=False),
            nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
        )])
        self.proj = ConvLayer(2 * total, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        b, _, h, w = qkv.shape
        qkv = qkv.reshape(b, -1, 3 * self.dim, h * w)
        q, k, v = F.relu(qkv[:, :, : self.dim]), F.relu(qkv[:, :, self.dim : 2 * self.dim]), qkv[:, :, 2 * self.dim :]
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # the ones row yields the normaliser
        out = (v @ k.transpose(-1, -2)) @ q
        out = out[:, :, :-1] / (out[:, :, -1:] + EPS)
        return self.proj(out.reshape(b, -1, h, w))


class EfficientViTBlock(nn.Module):
    """Residual LiteMLA (global context), then a residual MBConv (local)."""

    def __init__(self, channels: int, head_dim: int, expand: float) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, head_dim))
        self.local_module = Residual(MBConv(Local(channels, channels, 1, expand, fewer_norm=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))
