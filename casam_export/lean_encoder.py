"""Export-time rewrites of the image encoders into the node patterns onnxruntime runs fast.

Profiling the exported encoders (onnxruntime ``enable_profiling``, full-size random
weights, BENCHMARKS.md "edge encoders") showed where the graphs were written badly, not
where the arithmetic is:

- **GELU.** The exporter expands ``nn.GELU()`` as ``½·(1 + erf(x/√2))·x``, which
  onnxruntime's GeluFusion does not match: five passes over each MLP's widest tensor
  (Erf, Div, Add, Mul, Mul were a third of MobileSAM's encoder time, more than its
  matmuls). Written as ``erf_gelu`` it becomes one fused Gelu kernel. The same holds for
  SAM's ViT MLPs.
- **tanh GELU** (EfficientViT). onnxruntime's FastGeluFusion replaces one spelling of the
  tanh form, ``(x·½)·(1 + tanh((x·√(2/π))·(1 + (x·0.044715)·x)))``, by one FastGelu kernel
  (the Pow spelling is not matched at opset 18, where Pow's version is newer than the
  fusion checks). ``fusable_tanh_gelu`` is that spelling: nine nodes in the file, which
  TensorRT and OpenVINO fuse themselves, and one pass in onnxruntime. The earlier
  ``x·σ(2u)`` form ran six passes (and layout reorders around them): a quarter of
  EfficientViT-SAM-L0's encoder time.
- **TinyViT's first stage** (MBConv at 256×256 tokens, 256 hidden channels: 67 MB per
  tensor, with onnxruntime's layout copies several alive at once) set casam-infer's peak
  memory. Its 1×1 convolutions are per pixel and its 3×3 depthwise one needs one row of
  context, so it runs in bands of ``BAND_ROWS`` output rows, each computed from its rows
  plus a one-row halo: the same sums per pixel, a quarter of the live memory.
- **TinyViT's transformer stages**: casam_export/lean_tiny_vit.py (q/k/v products, Gemm
  bias adds, grid permutes).
- **Bicubic resize** (EfficientViT-SAM's neck, 16² and 32² maps → 64²). onnxruntime's cubic
  Resize is a generic per-pixel loop (two nodes took 13% of the encoder). Bicubic with
  ``align_corners=False`` is separable and linear, so it is ``A·X·Aᵀ`` with a constant
  64×n matrix ``A`` read off ``F.interpolate`` itself: two small matmuls.

Each rewrite is the model's own function within float32 rounding (tests/test_edge_lean_encoder.py);
it is swapped in only while tracing, and the PyTorch model keeps its modules.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from casam_export.lean_attention import lean_global_attention
from casam_export.lean_decoder import erf_gelu
from casam_export.lean_tiny_vit import TINY_VIT_FORWARDS
from models.encoders.efficientvit import EMBED_SIDE, Resize64
from models.encoders.tiny_vit_conv import MBConv

#: Recorded in the encoder's ``built_from``, so a change here re-exports older encoders.
LEAN_ENCODER_VERSION = "lean-enc-v2"

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

#: Output rows per band of a banded MBConv; maps of at most this many rows are left whole.
BAND_ROWS = 64


def fusable_tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """``nn.GELU(approximate="tanh")`` in the node pattern of onnxruntime's FastGeluFusion.

    ½x(1 + tanh(√(2/π)(x + 0.044715x³))) with √(2/π)(x + 0.044715x³) = (√(2/π)x)(1 + 0.044715x·x);
    the constants are the float32 values the fusion compares against.
    """
    inner = (x * _SQRT_2_OVER_PI) * (1.0 + (x * 0.044715) * x)
    return (x * 0.5) * (1.0 + torch.tanh(inner))


def _gelu_forward(self: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    return erf_gelu(x) if self.approximate == "none" else fusable_tanh_gelu(x)


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """n_out×n_in matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis.

    Read off torch itself: interpolating the n_in unit impulses (the other axis is size 1,
    where bicubic weights are exactly (0, 1, 0, 0)), so border clamping matches by construction.
    """
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    cols = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)  # n_in×1×n_out×1
    return cols.reshape(n_in, n_out).t().contiguous().float()


def _resize_forward(self: Resize64, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (EMBED_SIDE, EMBED_SIDE):
        return x
    rows, cols = bicubic_matrix(h, EMBED_SIDE), bicubic_matrix(w, EMBED_SIDE)
    return torch.matmul(torch.matmul(rows, x), cols.t())


def _banded_mbconv_forward(self: MBConv, x: torch.Tensor) -> torch.Tensor:
    """MBConv.forward in horizontal bands (stride 1, one 3×3 depthwise conv: a one-row halo).

    At a band's edge inside the map the halo row supplies the true neighbours; the conv's
    zero padding then only reaches the halo's own outputs, which are cropped. At the map's
    edges there is no halo and the padding acts as in the whole-map conv."""
    h = x.shape[2]
    if h <= BAND_ROWS:
        return MBConv.forward(self, x)
    bands = []
    for r0 in range(0, h, BAND_ROWS):
        r1 = min(h, r0 + BAND_ROWS)
        lo, hi = max(0, r0 - 1), min(h, r1 + 1)
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x[:, :, lo:hi])))))
        bands.append(self.act3(x[:, :, r0:r1] + y[:, :, r0 - lo:r0 - lo + r1 - r0]))
    return torch.cat(bands, dim=2)


_LEAN_FORWARDS = {Resize64: _resize_forward, MBConv: _banded_mbconv_forward, **TINY_VIT_FORWARDS}


@contextlib.contextmanager
def _swapped_forwards(image_encoder: nn.Module) -> Iterator[int]:
    """GELUs, TinyViT's blocks and EfficientViT's resizes use the lean forwards; yields how many were swapped."""
    swapped = []
    for module in image_encoder.modules():
        if isinstance(module, nn.GELU):
            module.forward = types.MethodType(_gelu_forward, module)
        elif type(module) in _LEAN_FORWARDS:
            module.forward = types.MethodType(_LEAN_FORWARDS[type(module)], module)
        else:
            continue
        swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward  # back to the class's forward


@contextlib.contextmanager
def lean_encoder(image_encoder: nn.Module) -> Iterator[int]:
    """The encoder job's tracing hook: lean global attention (SAM's ViTs) plus the rewrites
    above. Yields how many modules were swapped in all."""
    with lean_global_attention(image_encoder) as attention, _swapped_forwards(image_encoder) as others:
        yield attention + others
