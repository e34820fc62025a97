"""Export-time forms of SAM's small ops that onnxruntime and TensorRT fuse into one kernel.

The exporter traces each op as written, and SAM writes three of them in shapes the
runtimes' fusion passes do not recognise, so the exported graphs pay several passes over
large tensors where one would do:
- **LayerNorm2d** is written by hand (mean over channels, squared deviation, mean, sqrt,
  divide, scale, shift): nine nodes with strided channel reductions over the NCHW map.
  Channels-last it is ``F.layer_norm``: one LayerNormalization node, kept fp32 by op type
  under --fp16.
- **nn.GELU** exports as ``0.5 * (1 + erf(x/√2))`` times x, which onnxruntime's GeluFusion
  does not match; ``x * 0.5 * (1 + erf(x/√2))`` it fuses.
- **nn.Linear** on the encoder's B×H×W×C maps exports as MatMul then a separate bias Add
  over the whole output; on a 2-D view it is one Gemm with the bias fused.
Each form is the same arithmetic. The export swaps them in only while tracing (the PyTorch
model is untouched), and the export's parity check compares the chains.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.sam_import import load_modeling

#: Recorded in the encoder's ``built_from``, so a change here re-exports older encoders.
FUSABLE_OPS_VERSION = "fusable-v1"


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    """``nn.GELU()`` (the exact, erf form) in the node pattern onnxruntime fuses."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_forward(self: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    return erf_gelu(x)


def _layernorm2d_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``LayerNorm2d`` on B×C×H×W, channels-last."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
    return y.permute(0, 3, 1, 2)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` on a 2-D view of ``x``, so the bias fuses into a Gemm."""
    flat = x.reshape(-1, self.in_features)
    y = torch.addmm(self.bias, flat, self.weight.t()) if self.bias is not None else flat @ self.weight.t()
    return y.reshape(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def fusable_ops(module: nn.Module) -> Iterator[dict[str, int]]:
    """Within the block, ``module``'s LayerNorm2d, exact GELU and N-D Linear use the fusable forms.

    Yields how many of each were swapped.
    """
    layer_norm_2d = load_modeling().common.LayerNorm2d
    swaps = {"layernorm2d": _layernorm2d_forward, "gelu": _gelu_forward, "linear": _linear_forward}
    swapped: dict[str, list[nn.Module]] = {kind: [] for kind in swaps}
    for m in module.modules():
        if isinstance(m, layer_norm_2d):
            swapped["layernorm2d"].append(m)
        elif isinstance(m, nn.GELU) and m.approximate == "none":
            swapped["gelu"].append(m)
        elif isinstance(m, nn.Linear):
            swapped["linear"].append(m)
    for kind, mods in swapped.items():
        for m in mods:
            m.forward = types.MethodType(swaps[kind], m)
    try:
        yield {kind: len(mods) for kind, mods in swapped.items()}
    finally:
        for mods in swapped.values():
            for m in mods:
                del m.forward  # back to the class's forward
