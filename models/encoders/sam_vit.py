"""SAM's own ViT image encoder (vit_b/l/h and the ``tiny`` test model), from segment-anything."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from models.sam_import import load_modeling

PATCH = 16


@dataclass(frozen=True)
class ViTConfig:
    """Encoder hyper-parameters of one SAM ViT."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    mlp_ratio: float = 4.0

    family = "SAM ViT"

    def build(self, image_size: int) -> nn.Module:
        """segment-anything's ImageEncoderViT with SAM's settings (16-px patches, windows of 14)."""
        return load_modeling().ImageEncoderViT(
            depth=self.depth, embed_dim=self.embed_dim, img_size=image_size, mlp_ratio=self.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=self.num_heads, patch_size=PATCH,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(self.global_attn_indexes),
            window_size=14, out_chans=256,
        )
