"""SAM's LayerNorm2d traced as one LayerNormalization node, for the encoder export.

SAM writes LayerNorm2d by hand (mean over channels, squared deviation, mean, sqrt, divide,
scale, shift), which exports as nine elementwise and reduction nodes over the NCHW map;
onnxruntime reduces over the channel axis of NCHW with a strided kernel, and the four
ReduceMeans of the encoder's neck alone took ~12 ms of the tiny encoder's ~170 ms. Moving
channels last makes it ``F.layer_norm``: one fused node in onnxruntime and TensorRT, kept
fp32 by op type under --fp16, and the same arithmetic (biased variance, same eps). The
export swaps this forward in only while tracing; the PyTorch model is untouched.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.sam_import import load_modeling


def channels_last_layernorm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for segment-anything's ``LayerNorm2d.forward`` on B×C×H×W."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
    return y.permute(0, 3, 1, 2)


@contextlib.contextmanager
def channels_last_layernorms(module: nn.Module) -> Iterator[int]:
    """Within the block, every SAM LayerNorm2d inside ``module`` uses the fused form.

    Yields how many were swapped.
    """
    layer_norm_2d = load_modeling().common.LayerNorm2d
    swapped = [m for m in module.modules() if isinstance(m, layer_norm_2d)]
    for norm in swapped:
        norm.forward = types.MethodType(channels_last_layernorm_forward, norm)
    try:
        yield len(swapped)
    finally:
        for norm in swapped:
            del norm.forward  # back to the class's forward
