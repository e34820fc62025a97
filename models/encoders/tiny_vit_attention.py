"""TinyViT's window attention: multi-head self-attention inside one window, with a learned
bias per head for every (|Δrow|, |Δcol|) offset between two window positions."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def offset_index(window: int) -> tuple[torch.Tensor, int]:
    """N×N index (N = window²) of each position pair's offset, and how many offsets there are.

    Offsets are numbered in first-seen order over row-major pairs, the order the official
    ``attention_biases`` parameter is laid out in, so a checkpoint's biases land on the same pairs.
    """
    points = list(itertools.product(range(window), range(window)))
    numbers: dict[tuple[int, int], int] = {}
    index = [numbers.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(numbers)) for a in points for b in points]
    return torch.tensor(index, dtype=torch.long).view(len(points), len(points)), len(numbers)


class WindowAttention(nn.Module):
    """Pre-norm attention over B×N×C window tokens; value width equals key width per head."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index, count = offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        # Derived from the window size alone, so not part of the state dict (as upstream).
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
