"""TinyViT as MobileSAM's image encoder: 1024² image → SAM's 256×64×64 embedding.

Four stages after a stride-4 conv stem: MBConv blocks, then three stages of windowed
attention. MobileSAM's change to TinyViT is that the merge into the last stage keeps the
resolution, so the total stride is 16, and a SAM-style neck (1×1 conv, LayerNorm, 3×3 conv,
LayerNorm) maps the last stage to 256 channels. The classification head (``norm_head``,
``head``) is unused but kept: ``mobile_sam.pt`` holds it, and its keys must load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.encoders.conv_bn import ConvBN
from models.alignment import LayerNorm2d
from models.encoders.tiny_vit_block import AttentionStage
from models.encoders.tiny_vit_conv import ConvStage, PatchMerging

EMBED_CHANNELS = 256


@dataclass(frozen=True)
class TinyViTConfig:
    """Widths, depths, heads and windows per stage (stage 0 is convolutional: no heads/window)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    num_classes: int = 1000

    family = "TinyViT"

    def build(self, image_size: int) -> nn.Module:
        return TinyViT(self, image_size)

    def stage_resolutions(self, image_size: int) -> list[int]:
        """Token-grid side per stage: /4 after the stem, /2 per merge, the last merge /1."""
        sides, side = [], image_size // 4
        for i in range(len(self.embed_dims)):
            sides.append(side)
            side = side if i + 2 == len(self.embed_dims) else side // 2
        return sides


class TinyViT(nn.Module):
    """B×3×S×S normalised image → B×256×(S/16)×(S/16)."""

    def __init__(self, config: TinyViTConfig, image_size: int) -> None:
        super().__init__()
        dims, sides = config.embed_dims, config.stage_resolutions(image_size)
        self.out_side = sides[-1]
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(3, dims[0] // 2, 3, 2), nn.GELU(), ConvBN(dims[0] // 2, dims[0], 3, 2))
        self.layers = nn.ModuleList()
        for i, dim in enumerate(dims):
            last = i + 1 == len(dims)
            merge = None if last else PatchMerging(
                (sides[i], sides[i]), dim, dims[i + 1], stride=sides[i] // sides[i + 1])
            if i == 0:
                self.layers.append(ConvStage(dim, config.depths[0], config.mbconv_expand_ratio, merge))
            else:
                self.layers.append(AttentionStage(dim, (sides[i], sides[i]), config.depths[i], config.num_heads[i],
                                                  config.window_sizes[i], config.mlp_ratio, merge))
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], EMBED_CHANNELS, 1, bias=False), LayerNorm2d(EMBED_CHANNELS),
            nn.Conv2d(EMBED_CHANNELS, EMBED_CHANNELS, 3, padding=1, bias=False), LayerNorm2d(EMBED_CHANNELS),
        )
        self.apply(_init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.seq(image)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        grid = x.reshape(b, self.out_side, self.out_side, c).permute(0, 3, 1, 2)
        return self.neck(grid)


def _init(module: nn.Module) -> None:
    """Truncated-normal linear weights, as TinyViT initialises; a random-weight model then
    keeps activations in a realistic range (the bench times full-size random models)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
