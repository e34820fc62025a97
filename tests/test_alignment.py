"""AlignmentLayer / CAResBlock: exact architecture, parameter count and the authors' keys."""

import pytest
import torch

from models.alignment import ECA_KERNEL, AlignmentLayer, CAResBlock, count_parameters
from models.errors import ShapeError
from float32 import SAME_LIBRARY, f32_tol, peak


def authors_state_dict(num_blocks: int = 3, dim: int = 256) -> dict[str, torch.Tensor]:
    """The key names and shapes of the authors' align_cnn_3.pth, written out by hand."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(num_blocks):
        state[f"layers.{i}.conv1.weight"] = torch.randn(dim, dim, 3, 3, generator=g) * 0.01
        state[f"layers.{i}.conv1.bias"] = torch.randn(dim, generator=g) * 0.01
        state[f"layers.{i}.conv2.weight"] = torch.randn(dim, dim, 3, 3, generator=g) * 0.01
        state[f"layers.{i}.conv2.bias"] = torch.randn(dim, generator=g) * 0.01
        state[f"layers.{i}.conv.weight"] = torch.randn(1, 1, 5, generator=g)
    state["norm.weight"] = torch.rand(dim, generator=g) + 0.5
    state["norm.bias"] = torch.randn(dim, generator=g) * 0.1
    return state


def test_parameter_count_is_the_papers():
    assert count_parameters(AlignmentLayer()) == 3_541_007
    assert count_parameters(CAResBlock(256)) == 1_180_165


def test_eca_kernel_is_five_without_bias():
    block = CAResBlock(256)
    assert ECA_KERNEL == 5
    assert block.conv.kernel_size == (5,) and block.conv.padding == (2,) and block.conv.bias is None


def test_num_blocks_is_configurable():
    assert count_parameters(AlignmentLayer(num_blocks=1)) == 1_180_165 + 512
    with pytest.raises(ValueError):
        AlignmentLayer(num_blocks=0)


def test_authors_checkpoint_keys_load_strictly():
    layer = AlignmentLayer()
    layer.load_state_dict(authors_state_dict(), strict=True)
    assert set(layer.state_dict()) == set(authors_state_dict())


def test_one_shared_norm_applied_after_every_block():
    torch.manual_seed(0)
    layer = AlignmentLayer().eval()
    layer.load_state_dict(authors_state_dict())
    norms = [m for m in layer.modules() if type(m).__name__ == "LayerNorm2d"]
    assert len(norms) == 1
    calls = []
    layer.norm.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 256, 8, 8)
    out = layer(x)
    assert len(calls) == 3
    # Reference: x = norm(block(x)) three times, with a hand-written channel LayerNorm.
    ref = x
    for block in layer.layers:
        r = ref
        h = torch.nn.functional.conv2d(torch.relu(ref), block.conv1.weight, block.conv1.bias, padding=1)
        h = torch.nn.functional.conv2d(torch.relu(h), block.conv2.weight, block.conv2.bias, padding=1)
        w = torch.sigmoid(torch.nn.functional.conv1d(h.mean((2, 3))[:, None, :], block.conv.weight, padding=2))
        h = h * w[:, 0, :, None, None] + r
        u = h.mean(1, keepdim=True)
        s = (h - u).pow(2).mean(1, keepdim=True)
        ref = layer.norm.weight[:, None, None] * (h - u) / torch.sqrt(s + 1e-6) + layer.norm.bias[:, None, None]
    # Same library, other op order (hand-written norm); the longest reduction is a 3×3 conv
    # over 256 channels (n = 2304), M = the output's peak.
    torch.testing.assert_close(out, ref, rtol=0, atol=f32_tol(peak(ref), n=9 * 256, k=SAME_LIBRARY))


def test_wrong_feature_shape_is_named():
    with pytest.raises(ShapeError, match=r"B×256×H×W.*\(2, 128, 8, 8\)"):
        AlignmentLayer()(torch.zeros(2, 128, 8, 8))
