"""TinyViT's convolution + BatchNorm pair (children ``c`` and ``bn``, as the checkpoint names them)."""

from __future__ import annotations

from torch import nn


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm; ``bn_weight`` sets the initial BN scale
    (0 makes a residual branch start as the identity, as TinyViT initialises MBConv)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)
