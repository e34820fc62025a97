"""One TinyViT transformer block (window attention, depthwise conv, MLP) and a stage of them."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.conv_bn import ConvBN
from models.encoders.tiny_vit_attention import WindowAttention


class Mlp(nn.Module):
    """Pre-norm two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """B×H·W×C → same: windowed attention (zero-padded to whole windows), a 3×3 depthwise
    conv over the token grid, then the MLP; attention and MLP are residual."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), s = self.resolution, self.window
        b, _, c = x.shape
        if (h, w) == (s, s):
            return self.attn(x)
        pad_b, pad_r = (s - h % s) % s, (s - w % s) % s
        grid = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))  # padded tokens attend too, as upstream
        ph, pw = h + pad_b, w + pad_r
        tiles = grid.view(b, ph // s, s, pw // s, s, c).transpose(2, 3).reshape(-1, s * s, c)
        out = self.attn(tiles).view(b, ph // s, pw // s, s, s, c).transpose(2, 3).reshape(b, ph, pw, c)
        return out[:, :h, :w].reshape(b, h * w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (b, n, c) = self.resolution, x.shape
        x = x + self._windows(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    """TinyViT blocks at one resolution, then an optional merge into the next stage."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio) for _ in range(depth)]
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)
