"""Memory-lean global attention for exporting SAM's ViT encoder.

SAM's global-attention blocks materialise a (batch·heads)×4096×4096 attention map — 805 MB
per block for vit_b in fp32 — plus as much again for the relative-position terms and the
softmax. An edge runtime executing the exported graph has to hold those maps at once, so
`casam-infer` with vit_b needed several GB (ad hoc, no record). Computing one head and one
band of query rows at a time is the same arithmetic (each softmax row is independent), but
the largest live tensor becomes heads× and bands× smaller. The export swaps this forward
in only while tracing; the PyTorch model itself is untouched.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn

from models.sam_import import load_modeling

#: Query rows (of the 64×64 token grid) attended per chunk: 16 rows = 1024 queries.
ROWS_PER_CHUNK = 16


def _relative_terms(q_rows: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed rel-pos terms for a band of query rows, as batched matmuls.

    q_rows: B×R×W×C; rh: R×Kh×C (the band's rows); rw: W×Kw×C → (B×R×W×Kh, B×R×W×Kw).
    """
    b, r, w, c = q_rows.shape
    rel_h = torch.matmul(q_rows.permute(1, 0, 2, 3), rh.transpose(1, 2).unsqueeze(1)).permute(1, 0, 2, 3)
    per_col = q_rows.permute(2, 0, 1, 3).reshape(w, b * r, c)
    rel_w = torch.matmul(per_col, rw.transpose(1, 2)).reshape(w, b, r, -1).permute(1, 2, 0, 3)
    return rel_h, rel_w


def lean_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for segment-anything's ``Attention.forward`` (global blocks, rel-pos on)."""
    image_encoder = load_modeling().image_encoder
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3×B×heads×HW×C
    rh = image_encoder.get_rel_pos(h, h, self.rel_pos_h)  # H×H×C
    rw = image_encoder.get_rel_pos(w, w, self.rel_pos_w)  # W×W×C
    heads = []
    for head in range(self.num_heads):
        q, k, v = qkv[0, :, head], qkv[1, :, head], qkv[2, :, head]  # B×HW×C
        k_t = k.transpose(-2, -1)
        bands = []
        for r0 in range(0, h, ROWS_PER_CHUNK):
            r1 = min(h, r0 + ROWS_PER_CHUNK)
            q_band = q[:, r0 * w : r1 * w]
            attn = (q_band * self.scale) @ k_t  # B×(R·W)×HW
            rel_h, rel_w = _relative_terms(q_band.reshape(b, r1 - r0, w, -1), rh[r0:r1], rw)
            attn = (
                attn.view(b, r1 - r0, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
            ).view(b, (r1 - r0) * w, h * w)
            bands.append(attn.softmax(dim=-1) @ v)
        heads.append(torch.cat(bands, dim=1))  # B×HW×C
    out = torch.stack(heads, dim=1).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


@contextlib.contextmanager
def lean_global_attention(image_encoder: nn.Module) -> Iterator[int]:
    """Within the block, the encoder's global-attention blocks use the lean forward.

    Yields how many blocks were swapped. Windowed blocks (14×14 tokens) are left alone:
    their maps are small.
    """
    swapped = []
    for block in getattr(image_encoder, "blocks", ()):  # SAM's ViT only; TinyViT/EfficientViT have none
        if block.window_size == 0 and block.attn.use_rel_pos:
            block.attn.forward = types.MethodType(lean_attention_forward, block.attn)
            swapped.append(block.attn)
    try:
        yield len(swapped)
    finally:
        for attn in swapped:
            del attn.forward  # back to the class's forward
