"""The export-time encoder rewrites (casam_export/lean_encoder.py) are the encoders' own
functions within float32 rounding, and onnxruntime runs them as the fused nodes they aim at."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from casam_export.graphs import encoder_spec, export_graph, finalize, write_graph
from casam_export.lean_encoder import bicubic_matrix, fusable_tanh_gelu, lean_encoder
from models.encoders.tiny_vit_conv import MBConv
from models.sam_loader import SAM_SPECS, build_sam_architecture
from runtime.backends.ort import OrtBackend
from float32 import CROSS_LIBRARY, EPS32, SAME_LIBRARY, f32_tol, peak


def _encoder(name: str, seed: int) -> torch.nn.Module:
    """The variant's encoder with every BatchNorm randomised: at init TinyViT's MBConv branch
    ends in a zero-scale BatchNorm, which would hide any error in the branch."""
    torch.manual_seed(seed)
    encoder = build_sam_architecture(name).image_encoder.eval()
    with torch.no_grad():
        for bn in (m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.normal_(1.0, 0.3)
            bn.bias.normal_(0.0, 0.3)
            bn.running_mean.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return encoder


def test_fusable_form_is_tanh_gelu():
    """Elementwise: u = √(2/π)(x + 0.044715x³) = (√(2/π)x)(1 + 0.044715x·x) exactly; each
    side rounds u's few products and sum (relative eps32 each, |u| ≤ 2|x| on this range),
    then tanh to a few ulps and 1 + tanh (≤ eps32, it lies in [0, 2]), all scaled by |x|:
    |Δ| ≤ 8·eps32·max(|x|, 1). The exact (erf) GELU differs by up to 4.7e-4, far outside."""
    x = torch.linspace(-8, 8, 10001)
    diff = (fusable_tanh_gelu(x) - F.gelu(x, approximate="tanh")).abs()
    bound = 8 * EPS32 * x.abs().clamp_min(1.0)
    assert bool((diff <= bound).all()), f"max |Δ|/bound = {float((diff / bound).max()):.2f}"


@pytest.mark.parametrize("side", [16, 32, 7])
def test_bicubic_matrices_are_torchs_bicubic_resize(side):
    torch.manual_seed(side)
    x = torch.randn(2, 5, side, side) * 3
    rows = bicubic_matrix(side, 64)
    got = rows @ x @ rows.t()
    ref = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
    # Both sum the same 4×4 taps (n = 16) of magnitude M = max|x| with weights ≤ 1.3 in
    # magnitude, in another order; the matrix's weights are rounded to float32 once (≤ eps32/2
    # relative each), well inside the same bound.
    torch.testing.assert_close(got, ref, rtol=0, atol=f32_tol(peak(x), 16, SAME_LIBRARY))


@pytest.mark.parametrize("rows", [200, 64])
def test_banded_mbconv_is_mbconv(rows):
    """Bands with a one-row halo (the last band shorter: 200 = 3·64 + 8; 64 rows: one band)."""
    torch.manual_seed(rows)
    block = MBConv(16, 4.0).eval()
    with torch.no_grad():
        for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.normal_(1.0, 0.3)  # conv3's BatchNorm starts at scale 0: the branch would vanish
        x = torch.randn(1, 16, rows, 96)
        ref = MBConv.forward(block, x)
        with lean_encoder(block) as swapped:
            assert swapped == 4  # the block and its three GELUs
            got = block(x)
    # Per pixel the same sums (n = 64 hidden channels in conv3), in another blocking; GELU in
    # the fused erf form (SAME_LIBRARY: torch on both sides).
    torch.testing.assert_close(got, ref, rtol=0, atol=f32_tol(peak(ref), 64, SAME_LIBRARY))


@pytest.mark.parametrize("name", ["tiny_mobile_sam", "tiny_efficientvit"])
def test_lean_encoder_equals_the_encoder_and_restores_it(name):
    encoder = _encoder(name, 3)
    size = SAM_SPECS[name].image_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = encoder(x)
        with lean_encoder(encoder) as swapped:
            assert swapped > 0
            got = encoder(x)
        assert not any("forward" in vars(m) for m in encoder.modules())
    # One library, summation order only; n = the necks' 3×3 convolutions over 256 channels
    # (as tests/test_edge_parity.py), M = the embedding's peak.
    torch.testing.assert_close(got, ref, rtol=0, atol=f32_tol(peak(ref), 9 * 256, SAME_LIBRARY))


@pytest.mark.parametrize("name, absent, fused", [("tiny_mobile_sam", {"Erf", "Split"}, {"BiasGelu", "Gemm"}),
                                                 ("tiny_efficientvit", {"Resize", "Tanh", "Sigmoid"}, {"FastGelu"})])
def test_exported_lean_encoder_matches_torch_and_runs_fused(name, absent, fused, tmp_path):
    """The graph the export writes (traced under lean_encoder) against the PyTorch encoder;
    onnxruntime's CPU graph has no unfused erf GELU and no split of q/k/v (TinyViT), and no
    cubic Resize or tanh expansion (EfficientViT): its GELUs are FastGelu kernels."""
    encoder = _encoder(name, 4)
    spec = encoder_spec(SAM_SPECS[name].image_size)
    with lean_encoder(encoder):
        model = finalize(export_graph(encoder, spec, 18, 8), fp16=False)
    written = write_graph(model, spec, tmp_path, "encoder.onnx")
    x = np.random.default_rng(5).normal(size=(1, 3, *spec.inputs[0].shape[2:])).astype(np.float32)
    (emb,) = OrtBackend("ort-cpu").load("encoder", tmp_path / written.file).run({"image": x}).values()
    with torch.no_grad():
        ref = encoder(torch.from_numpy(x)).numpy()
    # torch against onnxruntime (fused Gelu, other kernels): CROSS_LIBRARY, n = 64×64 as test_export.
    np.testing.assert_allclose(emb, ref, rtol=0, atol=f32_tol(peak(ref), 64 * 64, CROSS_LIBRARY))
    OrtBackend("ort-cpu").session(tmp_path / written.file, optimized_copy=tmp_path / "optimized.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & absent, ops & absent
    assert fused <= ops, fused - ops
