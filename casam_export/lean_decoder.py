"""The exported mask decoder: SAM's arithmetic, with each image's work done once per image.

SAM's ``MaskDecoder`` copies the image embedding and its positional encoding once per
prompt (``repeat_interleave``) before the two-way transformer. Until the first block's
image-to-token attention, though, those K copies are identical, so K prompts pay K times
for the first block's image-side projections (a quarter of the decoder's arithmetic) and
for moving K copies through memory. Here the image stays a batch of one and broadcasts
against the K prompts' tokens, so one batched decoder call does the shared work once and
beats K separate calls, on a CPU as well as on a GPU.

The upscaling runs channels-last: a 2×2, stride-2 transposed convolution touches each
output pixel once, so it is a matmul followed by a pixel shuffle; LayerNorm2d is then a
plain LayerNorm over the last axis (one fused kernel in onnxruntime and TensorRT instead
of seven elementwise ops); and the pixel shuffle is applied to the one-channel mask at the
end instead of to the 32-channel features. Only the mask token that single-mask output
returns is projected.

With a previous mask (``mask_input``, the ``decoder_mask`` graph) each prompt has its own
dense embedding, so the image side becomes K images there; the rest is unchanged.

The PyTorch model keeps SAM's own decoder; this module is used only while exporting, and
the export's parity check compares the two chains.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ShapeError
from models.prompt_decoder import PromptDecoder

#: Recorded in the manifest's ``built_from``, so a change here re-exports older decoders.
LEAN_DECODER_VERSION = "lean-v1"


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    """``nn.GELU()`` (the exact, erf form) written as the node pattern onnxruntime fuses.

    The exporter's own expansion of ``aten.gelu`` scales ``(1 + erf)`` by ½ before
    multiplying by x, which onnxruntime's GeluFusion does not match: five separate passes
    over the largest tensors of the decoder instead of one fused kernel.
    """
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _shuffle_weight(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2×2 stride-2 transposed conv as (C_in × 4·C_out matrix, bias), columns ordered (dy, dx, c_out)."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0):
        raise ShapeError(f"lean decoder expects SAM's 2×2 stride-2 upscaling, got {conv}")
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.detach().permute(0, 2, 3, 1).reshape(c_in, 4 * c_out).contiguous()
    return weight, conv.bias.detach().repeat(4)


class LeanPromptDecoder(PromptDecoder):
    """Drop-in for ``PromptDecoder`` in the exported graph; same inputs, outputs and results."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__(sam)
        upscaling = self.mask_decoder.output_upscaling
        conv1, norm, act1, conv2, act2 = upscaling
        w1, b1 = _shuffle_weight(conv1)
        w2, b2 = _shuffle_weight(conv2)
        self.register_buffer("up1_weight", w1, persistent=False)
        self.register_buffer("up1_bias", b1, persistent=False)
        self.register_buffer("up2_weight", w2, persistent=False)
        self.register_buffer("up2_bias", b2, persistent=False)
        for act in (act1, act2):
            if not isinstance(act, nn.GELU) or act.approximate != "none":
                raise ShapeError(f"lean decoder expects SAM's exact GELU in the upscaling, got {act}")
        self.norm = norm
        self.c1, self.c2 = conv1.out_channels, conv2.out_channels

    def predict_masks(self, embeddings: torch.Tensor, sparse: torch.Tensor,
                      dense: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        md = self.mask_decoder
        k = sparse.shape[0]
        _, c, h, w = embeddings.shape
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0).unsqueeze(0).expand(k, -1, -1)
        tokens = torch.cat((tokens, sparse), dim=1)
        if dense is None:  # every prompt's dense embedding is no_mask_embed: one image for all K
            src = embeddings + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        else:  # decoder_mask.onnx: each prompt's previous mask makes its own image (K×C×H×W)
            src = embeddings + dense
        hs, keys = md.transformer(src, self.prompt_encoder.get_dense_pe(), tokens)  # keys: K×HW×C
        iou = md.iou_prediction_head(hs[:, 0, :])[:, 0:1]
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0: the single-mask output

        # Rows are pixels: 2-D matmuls let the bias fuse into a Gemm.
        x = torch.addmm(self.up1_bias, keys.reshape(k * h * w, c), self.up1_weight)
        x = x.reshape(k * h * w * 4, self.c1)  # pixels (i, j, dy, dx)
        x = erf_gelu(F.layer_norm(x, (self.c1,), self.norm.weight, self.norm.bias, self.norm.eps))
        x = erf_gelu(torch.addmm(self.up2_bias, x, self.up2_weight)).reshape(k, h * w * 16, self.c2)  # (…, ey, ex)
        masks = torch.matmul(x, hyper.unsqueeze(-1))  # K×(H·W·16)×1
        # Output row 4i + 2·dy + ey, column 4j + 2·dx + ex.
        masks = masks.reshape(k, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(k, 1, 4 * h, 4 * w)
        return masks, iou
