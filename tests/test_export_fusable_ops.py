"""The fusable op forms swapped in while exporting are SAM's ops, and runtimes do fuse them."""

import onnx
import torch

from casam_export.fusable_ops import erf_gelu, fusable_ops
from casam_export.graphs import ENCODER, export_graph, finalize, write_graph
from casam_export.lean_attention import lean_global_attention
from models.sam_loader import build_tiny_sam
from runtime.backends import OrtBackend


def test_erf_gelu_is_exact_gelu():
    x = torch.linspace(-8, 8, 10001)
    torch.testing.assert_close(erf_gelu(x), torch.nn.functional.gelu(x), rtol=1e-6, atol=1e-6)


def perturbed_encoder() -> torch.nn.Module:
    """The tiny encoder with LayerNorm affine terms away from their 1/0 init, which would hide a wrong one."""
    encoder = build_tiny_sam(seed=2).image_encoder.eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "norm" in name or name.startswith("neck"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return encoder


def test_fusable_forms_equal_sams_ops_and_are_restored():
    encoder = perturbed_encoder()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = encoder(x)
        with fusable_ops(encoder) as swapped:
            got = encoder(x)
        assert all("forward" not in vars(m) for m in encoder.modules())
    blocks = len(encoder.blocks)
    # The neck's two LayerNorm2d; one GELU per block's MLP; qkv, proj, lin1 and lin2 per block.
    assert swapped == {"layernorm2d": 2, "gelu": blocks, "linear": 4 * blocks}
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_exported_encoder_runs_fused_kernels(tmp_path):
    """In onnxruntime's CPU graph: Gelu (no Erf), LayerNormalization (no channel ReduceMean)
    and bias-fused Gemms (no MatMul followed by a bias Add)."""
    encoder = perturbed_encoder()
    with lean_global_attention(encoder), fusable_ops(encoder):
        graph = export_graph(encoder, ENCODER, 18, 16)
    written = write_graph(finalize(graph, fp16=False), ENCODER, tmp_path, "encoder.onnx")
    OrtBackend("ort-cpu").session(tmp_path / written.file, optimized_copy=tmp_path / "optimized.onnx")
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert "Gelu" in ops and "Erf" not in ops and "ReduceMean" not in ops
    assert ops.count("LayerNormalization") == 2 * len(encoder.blocks) + 2
    weights = {i.name for i in onnx.load(str(tmp_path / written.file)).graph.initializer}
    linear_biases = {n for n in weights if n.startswith("blocks.") and n.endswith(("qkv.bias", "proj.bias", "lin1.bias", "lin2.bias"))}
    fused = {b for n in nodes if n.op_type in ("Gemm", "FusedGemm") for b in n.input if b in linear_biases}
    assert fused == linear_biases, "every Linear's bias is fused into its Gemm"
