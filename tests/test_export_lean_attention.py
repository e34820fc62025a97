"""The lean global attention used for the encoder export is SAM's attention, chunked."""

import types

import pytest
import torch

from casam_export import lean_attention
from casam_export.lean_attention import lean_attention_forward, lean_global_attention
from models.sam_import import load_modeling
from float32 import SAME_LIBRARY, f32_tol, peak


@pytest.mark.parametrize("rows", [16, 24, 64])
def test_chunked_heads_and_rows_equal_sams_attention(monkeypatch, rows):
    monkeypatch.setattr(lean_attention, "ROWS_PER_CHUNK", rows)
    torch.manual_seed(0)
    block = load_modeling().image_encoder.Block(
        dim=64, num_heads=4, use_rel_pos=True, window_size=0, input_size=(64, 64)).eval()
    with torch.no_grad():
        for p in (block.attn.rel_pos_h, block.attn.rel_pos_w):
            p.normal_(std=0.5)  # zeros at init would hide a wrong rel-pos term
        x = torch.randn(2, 64, 64, 64)
        ref = block.attn(x)
        block.attn.forward = types.MethodType(lean_attention_forward, block.attn)
        got = block.attn(x)
    # Chunking reorders the softmax and attention·V sums over the 64×64 keys (n = 4096).
    torch.testing.assert_close(got, ref, rtol=0, atol=f32_tol(peak(ref), n=64 * 64, k=SAME_LIBRARY))


def test_context_swaps_only_global_blocks_and_restores(tiny_sam):
    encoder = tiny_sam.model.image_encoder
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        ref = encoder(x)
        with lean_global_attention(encoder) as swapped:
            assert swapped == sum(1 for b in encoder.blocks if b.window_size == 0) == 1
            assert all(("forward" in vars(b.attn)) == (b.window_size == 0) for b in encoder.blocks)
            got = encoder(x)
        assert all("forward" not in vars(b.attn) for b in encoder.blocks)
    # As above, the global block's sums over 64×64 keys (n = 4096), M = the encoder output's peak.
    torch.testing.assert_close(got, ref, rtol=0, atol=f32_tol(peak(ref), n=64 * 64, k=SAME_LIBRARY))
