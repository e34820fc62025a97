"""SAM's prompt encoder and mask decoder behind one (coords, labels) signature.

Boxes arrive as corner points with labels 2/3 and padding as label -1 (see
``runtime.prompts``). The embedding arithmetic is written with ``torch.where`` and masks
instead of SAM's in-place boolean indexing, which traces cleanly to ONNX, and adds the
same terms in the same order, so results are bit-identical to SAM's own prompt encoder.
An optional previous prediction (``mask_input``, K×1×256×256 low-res logits, one per
prompt) goes through SAM's own ``_embed_masks`` and replaces ``no_mask_embed`` as the dense
embedding, exactly as ``SamPredictor.predict(mask_input=...)`` does.
The exported ``decoder.onnx`` is this module with ``predict_masks`` restructured to do each
image's work once for all its prompts (``casam_export.lean_decoder``), the same arithmetic;
``decoder_mask.onnx`` is the same module traced with ``mask_input``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.errors import ShapeError


class PromptDecoder(nn.Module):
    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        emb = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        lab = labels.unsqueeze(-1)
        is_pad = (lab == -1).to(emb.dtype)
        emb = torch.where(lab == -1, torch.zeros_like(emb), emb)
        emb = emb + is_pad * pe.not_a_point_embed.weight
        for value in range(4):  # 0 negative, 1 positive, 2 box top-left, 3 box bottom-right
            emb = emb + (lab == value).to(emb.dtype) * pe.point_embeddings[value].weight
        return emb

    def forward(
        self, embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
        mask_input: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's 1×256×64×64 embedding, K prompts and optionally each prompt's previous
        K×1×256×256 low-res logits → (K×1×256×256 logits, K×1 IoU)."""
        if embeddings.ndim != 4 or embeddings.shape[0] != 1 or embeddings.shape[1] != 256:
            raise ShapeError(f"decoder expects one 1×256×H×W embedding, got shape {tuple(embeddings.shape)}")
        if point_coords.ndim != 3 or point_coords.shape[2] != 2 or point_labels.shape != point_coords.shape[:2]:
            raise ShapeError(
                f"decoder expects point_coords K×P×2 and point_labels K×P, got "
                f"{tuple(point_coords.shape)} and {tuple(point_labels.shape)}"
            )
        dense = None if mask_input is None else self.embed_masks(mask_input, point_coords.shape[0])
        return self.predict_masks(embeddings, self.embed_points(point_coords, point_labels), dense)

    def embed_masks(self, mask_input: torch.Tensor, k: int) -> torch.Tensor:
        """K×1×(4·H)×(4·W) previous logits → K×256×H×W dense embeddings (SAM's ``_embed_masks``)."""
        h, w = self.prompt_encoder.image_embedding_size
        if mask_input.ndim != 4 or mask_input.shape[1] != 1 or mask_input.shape[0] != k \
                or tuple(mask_input.shape[2:]) != (4 * h, 4 * w):
            raise ShapeError(f"mask_input must be {k}×1×{4 * h}×{4 * w} (one previous low-res mask per prompt), "
                             f"got shape {tuple(mask_input.shape)}")
        return self.prompt_encoder._embed_masks(mask_input)

    def predict_masks(self, embeddings: torch.Tensor, sparse: torch.Tensor,
                      dense: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's own mask decoder, single-mask output: 1×256×64×64, K×P×256 and the K×256×64×64
        dense embeddings (None: ``no_mask_embed`` for every prompt) → (K×1×256×256, K×1)."""
        if dense is None:
            k = sparse.shape[0]
            h, w = self.prompt_encoder.image_embedding_size
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, h, w)
        return self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
