"""CA-SAM's per-task Alignment Layer: three channel-attention residual blocks.

The layer sits between SAM's frozen encoder and decoder and is the only part of the
segmentation path that a task trains. Attribute names follow the authors' code so that
their ``align_cnn_3.pth`` loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ShapeError

ECA_KERNEL = 5


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a B×C×H×W map (SAM's LayerNorm2d, eps 1e-6).

    Written with ``F.layer_norm`` rather than SAM's hand-expanded mean/variance so that it
    exports as one ONNX ``LayerNormalization`` node, which the fp16 converter and TensorRT
    can keep in fp32 by op type. The arithmetic is the same (biased variance).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class CAResBlock(nn.Module):
    """Pre-activation residual block with ECA channel attention (no reduction MLP).

    ``out = conv2(relu(conv1(relu(x)))) * eca + x``: ECA reweights channels from their
    global average with a 1-D conv across channels, which costs 5 parameters.
    """

    def __init__(self, dim: int = 256, eca_kernel: int = ECA_KERNEL) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=True)
        self.conv = nn.Conv1d(1, 1, kernel_size=eca_kernel, padding=eca_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.conv1(F.relu(x))
        x = self.conv2(F.relu(x))
        b, c = x.shape[0], x.shape[1]
        w = x.mean(dim=(2, 3)).reshape(b, 1, c)  # B×1×C: channels as a 1-D signal
        w = torch.sigmoid(self.conv(w)).reshape(b, c, 1, 1)
        return x * w + residual


class AlignmentLayer(nn.Module):
    """``num_blocks`` CAResBlocks, each followed by one shared LayerNorm2d; no outer skip."""

    def __init__(self, num_blocks: int = 3, dim: int = 256) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.dim = dim
        self.layers = nn.ModuleList(CAResBlock(dim) for _ in range(num_blocks))
        self.norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ShapeError(
                f"AlignmentLayer expects B×{self.dim}×H×W embeddings, got shape {tuple(x.shape)}"
            )
        for block in self.layers:
            x = self.norm(block(x))
        return x


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
