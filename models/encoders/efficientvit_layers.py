"""EfficientViT's building blocks: conv+norm+act, the three local blocks (ResBlock,
FusedMBConv, MBConv), a residual wrapper and a plain sequence.

Attribute names follow the EfficientViT release (``conv``/``norm``, ``main``, ``op_list``,
``spatial_conv``…) because the checkpoint's state-dict keys are those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


def gelu() -> nn.Module:
    """EfficientViT's GELU is the tanh approximation."""
    return nn.GELU(approximate="tanh")


class ConvLayer(nn.Module):
    """Same-padded convolution, then BatchNorm and activation where asked."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 bias: bool = False, norm: bool = True, act: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else None
        self.act = gelu() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x if self.norm is None else self.norm(x)
        return x if self.act is None else self.act(x)


@dataclass(frozen=True)
class Local:
    """One local block's shape: channels, stride, expansion, and ``fewer_norm`` (biases
    instead of BatchNorm on every conv but the last, as EfficientViT's deeper stages do)."""

    cin: int
    cout: int
    stride: int = 1
    expand: float = 1.0
    fewer_norm: bool = False

    @property
    def mid(self) -> int:
        return round(self.cin * self.expand)

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, last: bool = False) -> ConvLayer:
        """Inner convs are biased and norm-free under fewer_norm; the last is always normed, no act."""
        plain = self.fewer_norm and not last
        return ConvLayer(cin, cout, kernel, stride, groups, bias=plain, norm=not plain, act=not last)


class ResBlock(nn.Module):
    def __init__(self, s: Local) -> None:
        super().__init__()
        self.conv1 = s.conv(s.cin, s.mid, 3, s.stride)
        self.conv2 = s.conv(s.mid, s.cout, 3, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    def __init__(self, s: Local) -> None:
        super().__init__()
        self.spatial_conv = s.conv(s.cin, s.mid, 3, s.stride)
        self.point_conv = s.conv(s.mid, s.cout, 1, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    def __init__(self, s: Local) -> None:
        super().__init__()
        self.inverted_conv = s.conv(s.cin, s.mid, 1)
        self.depth_conv = s.conv(s.mid, s.mid, 3, s.stride, groups=s.mid)
        self.point_conv = s.conv(s.mid, s.cout, 1, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


LOCAL_BLOCKS = {"res": ResBlock, "fmb": FusedMBConv, "mb": MBConv}


class Residual(nn.Module):
    """``main(x) + x``, or ``main(x)`` alone where the block changes the shape."""

    def __init__(self, main: nn.Module, shortcut: bool = True) -> None:
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x if self.shortcut else self.main(x)


class OpSequential(nn.Module):
    """Modules applied in turn (stored as ``op_list``, the checkpoint's name)."""

    def __init__(self, ops: Sequence[Optional[nn.Module]]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList([op for op in ops if op is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x
