"""EfficientViT-L as EfficientViT-SAM's image encoder: 512² image → SAM's 256×64×64 embedding.

Backbone: a stride-2 stem with ResBlocks, then four stride-2 stages (FusedMBConv,
FusedMBConv, MBConv, EfficientViT attention blocks). Neck: the last three stages, each
projected to 256 channels and resized (bicubic) to 64×64, summed, refined by FusedMBConv
blocks and projected; then a channel LayerNorm. Module names follow the release
checkpoints (``backbone.stages.*.op_list``, ``neck.input_ops``…), so they load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.efficientvit_layers import LOCAL_BLOCKS, ConvLayer, Local, OpSequential, Residual
from models.alignment import LayerNorm2d
from models.encoders.lite_mla import EfficientViTBlock

EMBED_CHANNELS = 256
EMBED_SIDE = 64


@dataclass(frozen=True)
class EfficientViTConfig:
    """EfficientViT-L widths/depths per stage, attention head width, and the neck's depth.
    Stage kinds and expansions are those of the L family: res, fmb, fmb, mb, attention."""

    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    depths: tuple[int, ...] = (1, 1, 1, 4, 4)
    head_dim: int = 32
    neck_depth: int = 4
    blocks: tuple[str, ...] = ("res", "fmb", "fmb", "mb", "att")
    expands: tuple[float, ...] = (1, 4, 4, 4, 6)
    fewer_norm: tuple[bool, ...] = (False, False, False, True, True)

    family = "EfficientViT-L"

    def build(self, image_size: int) -> nn.Module:
        """The encoder; its neck resizes to 64×64 whatever ``image_size`` is (512 for L0–L2)."""
        return EfficientViTSamEncoder(self)


def _stage(cfg: EfficientViTConfig, i: int) -> OpSequential:
    """Stage i ≥ 1: a stride-2 block (MBConv for attention stages), then depth[i] blocks."""
    w, kind = cfg.widths[i], cfg.blocks[i]
    down = Local(cfg.widths[i - 1], w, 2, cfg.expands[i] * 4, cfg.fewer_norm[i])
    ops: list[nn.Module] = [Residual(LOCAL_BLOCKS[kind if kind in ("mb", "fmb") else "mb"](down), shortcut=False)]
    for _ in range(cfg.depths[i]):
        if kind == "att":
            ops.append(EfficientViTBlock(w, cfg.head_dim, cfg.expands[i]))
        else:
            ops.append(Residual(LOCAL_BLOCKS[kind](Local(w, w, 1, cfg.expands[i], cfg.fewer_norm[i]))))
    return OpSequential(ops)


class EfficientViTLargeBackbone(nn.Module):
    def __init__(self, cfg: EfficientViTConfig) -> None:
        super().__init__()
        w0 = cfg.widths[0]
        stem = [ConvLayer(3, w0, 3, 2, act=True)] + [
            Residual(LOCAL_BLOCKS[cfg.blocks[0]](Local(w0, w0, 1, cfg.expands[0], cfg.fewer_norm[0])))
            for _ in range(cfg.depths[0])
        ]
        self.stages = nn.ModuleList([OpSequential(stem)] + [_stage(cfg, i) for i in range(1, len(cfg.widths))])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, first to last."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class Resize64(nn.Module):
    """Bicubic resize to the embedding grid (a no-op on a map already that size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (EMBED_SIDE, EMBED_SIDE):
            return x
        return F.interpolate(x, size=(EMBED_SIDE, EMBED_SIDE), mode="bicubic", align_corners=False)


class SamNeck(nn.Module):
    """The last three stages (deepest first) → one 256×64×64 map."""

    def __init__(self, cfg: EfficientViTConfig) -> None:
        super().__init__()
        ins = list(reversed(cfg.widths[-3:]))
        self.input_ops = nn.ModuleList(
            [OpSequential([ConvLayer(c, EMBED_CHANNELS, 1), Resize64()]) for c in ins])
        self.middle = OpSequential([
            Residual(LOCAL_BLOCKS["fmb"](Local(EMBED_CHANNELS, EMBED_CHANNELS, 1, 1.0))) for _ in range(cfg.neck_depth)
        ])
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(EMBED_CHANNELS, EMBED_CHANNELS, 1, bias=True, norm=False)])])

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        feats = list(reversed(stages[-3:]))
        merged = self.input_ops[0](feats[0])
        for op, feat in zip(self.input_ops[1:], feats[1:]):
            merged = merged + op(feat)
        return self.output_ops[0](self.middle(merged))


class EfficientViTSamEncoder(nn.Module):
    """B×3×S×S normalised image → B×256×64×64 (S = 512 for the L family)."""

    def __init__(self, cfg: EfficientViTConfig, eps: float = 1e-6) -> None:
        super().__init__()
        self.backbone = EfficientViTLargeBackbone(cfg)
        self.neck = SamNeck(cfg)
        self.norm = LayerNorm2d(EMBED_CHANNELS, eps)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(self.neck(self.backbone(image)))
