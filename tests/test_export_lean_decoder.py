"""The lean decoder used for the decoder export is SAM's mask decoder, with shared work done once."""

import numpy as np
import onnx
import pytest
import torch

from casam_export.graphs import DECODER, export_graph, finalize, write_graph
from casam_export.lean_decoder import LeanPromptDecoder, erf_gelu
from models.prompt_decoder import PromptDecoder
from models.sam_loader import build_tiny_sam
from runtime.backends import OrtBackend
from runtime.prompts import encode_prompts
from float32 import CROSS_LIBRARY, EPS32, SAME_LIBRARY, f32_tol, peak


@pytest.fixture(scope="module")
def perturbed_sam():
    """The tiny SAM with every parameter perturbed: LayerNorm's 1/0 init would hide a wrong affine term."""
    sam = build_tiny_sam(seed=5).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        sam.prompt_encoder.no_mask_embed.weight.normal_(generator=gen)
    return sam


def prompts(k: int, with_points: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    corners = np.sort(rng.uniform(0, 1024, (k, 2, 2)), axis=1)
    boxes = corners.reshape(k, 4)[:, [0, 2, 1, 3]].astype(np.float32)
    points = rng.uniform(0, 1024, (k, 2, 2)).astype(np.float32) if with_points else None
    labels = rng.integers(0, 2, (k, 2)).astype(np.float32) if with_points else None
    coords, point_labels = encode_prompts(boxes, points, labels)
    return torch.from_numpy(coords), torch.from_numpy(point_labels)


@pytest.mark.parametrize("k,with_points", [(1, False), (3, True), (8, False)])
def test_lean_decoder_equals_sams_decoder(perturbed_sam, k, with_points):
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(k))
    coords, labels = prompts(k, with_points, seed=k)
    with torch.no_grad():
        ref_masks, ref_iou = PromptDecoder(perturbed_sam)(emb, coords, labels)
        masks, iou = LeanPromptDecoder(perturbed_sam)(emb, coords, labels)
    assert masks.shape == ref_masks.shape == (k, 1, 256, 256) and iou.shape == (k, 1)
    # Same library, rearranged sums: the longest are the attentions over 64×64 image tokens (n = 4096).
    torch.testing.assert_close(masks, ref_masks, rtol=0, atol=f32_tol(peak(ref_masks), n=64 * 64, k=SAME_LIBRARY))
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=f32_tol(peak(ref_iou), n=64 * 64, k=SAME_LIBRARY))


def test_image_side_of_the_first_block_runs_once_for_all_prompts(perturbed_sam):
    """The first block's image keys/values are projected for one image, not once per prompt."""
    lean = LeanPromptDecoder(perturbed_sam)
    first = lean.mask_decoder.transformer.layers[0]
    seen: dict[str, tuple] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            seen[name] = tuple(args[0].shape)
        return hook

    hooks = [first.cross_attn_token_to_image.k_proj.register_forward_hook(record("k")),
             first.cross_attn_image_to_token.q_proj.register_forward_hook(record("q"))]
    coords, labels = prompts(5, False)
    with torch.no_grad():
        lean(torch.randn(1, 256, 64, 64), coords, labels)
    for h in hooks:
        h.remove()
    assert seen == {"k": (1, 4096, 256), "q": (1, 4096, 256)}


def test_erf_gelu_is_exact_gelu():
    """Elementwise: both sides compute x·½·(1 + erf(x/√2)). Each rounds 1 + erf (≤ eps32, as it
    lies in [0, 2]) and evaluates erf to a few ulps of 1 (torch's vectorised erf differs by
    CPU family: AVX-512 and AVX2 kernels), all scaled by |x|/2; so |Δ| ≤ 8·eps32·max(|x|, 1).
    A wrong formula (tanh approximation: |Δ| up to 4.7e-4) is far outside."""
    x = torch.linspace(-8, 8, 10001)
    diff = (erf_gelu(x) - torch.nn.functional.gelu(x)).abs()
    bound = 8 * EPS32 * x.abs().clamp_min(1.0)
    assert bool((diff <= bound).all()), f"max |Δ|/bound = {float((diff / bound).max()):.2f}"


def test_exported_lean_decoder_batches_like_separate_calls_and_fuses_on_cpu(perturbed_sam, tmp_path):
    """One K=8 call equals eight K=1 calls, and onnxruntime's CPU graph has a fused Gelu
    (not the five-op erf expansion) and no SkipLayerNormalization (slower on the CPU)."""
    written = write_graph(finalize(export_graph(LeanPromptDecoder(perturbed_sam), DECODER, 18, 16), fp16=False),
                          DECODER, tmp_path, "decoder.onnx")
    engine = OrtBackend("ort-cpu").load("decoder", tmp_path / written.file)
    emb = np.random.default_rng(2).normal(size=(1, 256, 64, 64)).astype(np.float32)
    coords, labels = (t.numpy() for t in prompts(8, False, seed=2))
    batched = engine.run({"embeddings": emb, "point_coords": coords, "point_labels": labels})
    for i in range(8):
        one = engine.run({"embeddings": emb, "point_coords": coords[i:i + 1], "point_labels": labels[i:i + 1]})
        # One library; a batch of 8 changes the matmuls' blocking. Longest sums: 64×64 image tokens.
        np.testing.assert_allclose(batched["low_res_masks"][i:i + 1], one["low_res_masks"], rtol=0,
                                   atol=f32_tol(peak(one["low_res_masks"]), n=64 * 64, k=SAME_LIBRARY))
        np.testing.assert_allclose(batched["iou_predictions"][i:i + 1], one["iou_predictions"], rtol=0,
                                   atol=f32_tol(peak(one["iou_predictions"]), n=64 * 64, k=SAME_LIBRARY))
    with torch.no_grad():
        ref, _ = PromptDecoder(perturbed_sam)(torch.from_numpy(emb), torch.from_numpy(coords), torch.from_numpy(labels))
    # onnxruntime against torch (fused Gelu and LayerNorm), sums over 64×64 image tokens.
    np.testing.assert_allclose(batched["low_res_masks"], ref.numpy(), rtol=0,
                               atol=f32_tol(peak(ref), n=64 * 64, k=CROSS_LIBRARY))

    OrtBackend("ort-cpu").session(tmp_path / written.file, optimized_copy=tmp_path / "optimized.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "Gelu" in ops and "Erf" not in ops
    assert "SkipLayerNormalization" not in ops and "ConvTranspose" not in ops
