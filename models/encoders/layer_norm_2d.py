"""Channel LayerNorm of an N×C×H×W map: both edge encoders end their neck with one."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of N×C×H×W (parameters ``weight``/``bias`` of size C).

    Written out (mean, centred variance, rsqrt) rather than permuting to N×H×W×C, which is
    the same arithmetic as both reference necks and exports to a handful of ONNX nodes.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        normed = centred / torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]
