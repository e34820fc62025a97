"""TinyViT's convolutional parts: the inverted-residual MBConv, the first stage built of
them, and the patch merging that joins two stages."""

from __future__ import annotations

import torch
from torch import nn

from models.encoders.conv_bn import ConvBN


class MBConv(nn.Module):
    """1×1 expand → 3×3 depthwise → 1×1 project, added to the input, then GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_weight=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """Token grid (B×H·W×C, or B×C×H×W from the conv stage) → B×H'·W'×C' tokens.

    ``stride`` is 2 between stages, except into MobileSAM's last stage, which keeps the
    resolution so that a 1024² image ends at SAM's 64×64 embedding grid.
    """

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    """TinyViT's first stage: MBConv blocks at full token resolution, then a merge."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)
