"""Export-time forwards for TinyViT's transformer stages (MobileSAM's encoder), written in
the node patterns that onnxruntime's CPU kernels run without extra copies.

Profiling the exported encoder (onnxruntime ``enable_profiling``, BENCHMARKS.md "edge
encoders") showed a fifth of its time in layout copies around the matrix products, not in
the products themselves:

- **q, k, v.** The checkpoint's ``qkv`` projection interleaves them per head, so the graph
  split one product's output three ways (a copy) and then transposed k along its innermost
  axis, the slowest transpose onnxruntime has. Here the weight's rows are regrouped at trace
  time into three products, and k is transposed as one B×N×C → B×C×N matrix transpose.
- **Bias adds.** A Linear on B×N×C tokens exports as MatMul + Add: a second pass over the
  output. Flattened to rows, it is one Gemm that adds the bias as it writes. Only ``fc1``
  keeps the MatMul form, because onnxruntime fuses its bias with the GELU that follows.
- **Grid ↔ tokens.** The depthwise conv and the patch merging read the token grid as
  B×C×H×W. Written as one 4-D permute each way, onnxruntime folds the permute into the
  blocked-layout reorder its convolutions need anyway (no separate Transpose).

Each forward computes the module's own function (the same sums, in the same order within a
product); tests/test_edge_lean_encoder.py checks them against the modules within float32
rounding. The PyTorch modules keep their own forwards: these are swapped in only while tracing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.tiny_vit_attention import WindowAttention
from models.encoders.tiny_vit_block import Mlp, TinyViTBlock
from models.encoders.tiny_vit_conv import PatchMerging


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` on the tokens flattened to rows: exported as one Gemm with its bias."""
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def grid_conv(conv: nn.Module, tokens: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """B×H·W×C tokens through a conv on their H×W grid, back to B×H·W×C', by 4-D permutes."""
    b, _, c = tokens.shape
    y = conv(tokens.view(b, side[0], side[1], c).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(b, side[0] * side[1], y.shape[1])


def split_qkv(attn: WindowAttention) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of q, k and v: the rows of the per-head interleaved ``qkv`` regrouped."""
    heads, width = attn.num_heads, attn.head_dim
    dim = attn.qkv.in_features
    weight = attn.qkv.weight.view(heads, 3, width, dim)
    bias = attn.qkv.bias.view(heads, 3, width)
    return [(weight[:, i].reshape(heads * width, dim), bias[:, i].reshape(heads * width)) for i in range(3)]


def window_attention_forward(self: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """``WindowAttention.forward`` with three q/k/v Gemms and k transposed as a matrix."""
    b, n, _ = x.shape
    heads, width = self.num_heads, self.head_dim
    normed = self.norm(x)
    (wq, bq), (wk, bk), (wv, bv) = split_qkv(self)
    q = rows_linear(normed, wq, bq).view(b, n, heads, width).transpose(1, 2)
    k_t = rows_linear(normed, wk, bk).transpose(1, 2).reshape(b, heads, width, n)
    v = rows_linear(normed, wv, bv).view(b, n, heads, width).transpose(1, 2)
    bias = self.attention_biases[:, self.attention_bias_idxs]
    attn = ((q @ k_t) * self.scale + bias).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, heads * width)
    return rows_linear(out, self.proj.weight, self.proj.bias)


def mlp_forward(self: Mlp, x: torch.Tensor) -> torch.Tensor:
    """``Mlp.forward`` with fc2 as a Gemm (fc1 stays a MatMul, fused with its bias and GELU)."""
    return rows_linear(self.act(self.fc1(self.norm(x))), self.fc2.weight, self.fc2.bias)


def block_forward(self: TinyViTBlock, x: torch.Tensor) -> torch.Tensor:
    """``TinyViTBlock.forward`` with its depthwise conv reading the grid by 4-D permutes."""
    x = x + self._windows(x)
    x = grid_conv(self.local_conv, x, self.resolution)
    return x + self.mlp(x)


def merging_forward(self: PatchMerging, x: torch.Tensor) -> torch.Tensor:
    """``PatchMerging.forward`` returning tokens by one 4-D permute."""
    if x.ndim == 3:
        h, w = self.resolution
        x = x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)
    y = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
    return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])


#: Module class → its export-time forward (casam_export/lean_encoder.py swaps them in).
TINY_VIT_FORWARDS = {WindowAttention: window_attention_forward, Mlp: mlp_forward, TinyViTBlock: block_forward,
                     PatchMerging: merging_forward}
