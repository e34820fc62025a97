"""Parity of our edge encoders with the reference implementations (issue 25).

MobileSAM's reference is ``mobilesam-mirror`` (package ``mobile_sam``), EfficientViT-SAM's
is ``efficientsam``: code-only PyPI packages, used here as test references only. Both sides
are built with the same random weights: our state dict is loaded into the reference with
``strict=True``, which is the check that the keys (hence the official checkpoints) match.
Every constant-initialised tensor (BatchNorm scales and statistics, LayerNorm affine,
TinyViT's attention biases, zero-initialised branches) is randomised first, so no branch
of either model hides behind an identity.

The references import timm (MobileSAM) and torchvision (EfficientViT-SAM's transforms)
at module level for things the model never runs; they are satisfied with stub modules
inserted into ``sys.modules`` only while the references are imported, inside this file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from casam_export.graphs import DECODER, encoder_spec, export_graph
from casam_export.lean_decoder import LeanPromptDecoder
from casam_export.lean_encoder import lean_encoder
from float32 import CROSS_LIBRARY, SAME_LIBRARY, f32_tol, peak
from conftest import missing
from models.casam import CASAM
from models.sam_loader import SAM_SPECS, build_sam_architecture
from runtime.postprocess import logits_to_original, masks_from_logits
from runtime.preprocess import preprocess
from runtime.prompts import Prompts
from models.sam_loader import sam_preprocessing

# ----- the references, imported with stubs for what they import but never run -----------------


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package, so submodules resolve to the stubs below
    return module


def _stubs() -> dict[str, types.ModuleType]:
    functional = _module("torchvision.transforms.functional", resize=None, to_pil_image=None)
    return {
        "timm": _module("timm"), "timm.models": _module("timm.models"),
        "timm.models.layers": _module("timm.models.layers", DropPath=_DropPath, trunc_normal_=nn.init.trunc_normal_,
                                      to_2tuple=lambda x: x if isinstance(x, tuple) else (x, x)),
        "timm.models.registry": _module("timm.models.registry", register_model=lambda f: f),
        "torchvision": _module("torchvision"), "torchvision.transforms.functional": functional,
        "torchvision.transforms": _module("torchvision.transforms", Compose=list, ToTensor=lambda: None,
                                          Normalize=lambda **kw: None, functional=functional),
        "torchvision.ops": _module("torchvision.ops"),
        "torchvision.ops.boxes": _module("torchvision.ops.boxes", batched_nms=None, box_area=None),
    }


def references() -> types.SimpleNamespace:
    """The two reference packages' model modules (skip, or fail under CI, when absent)."""
    for module, package in (("mobile_sam", "mobilesam-mirror"), ("efficientsam", "efficientsam")):
        if importlib.util.find_spec(module) is None:
            missing(f"the reference package {package} is not installed (pip install -e '.[dev]')")
    stubs = {k: v for k, v in _stubs().items() if k not in sys.modules}
    sys.modules.update(stubs)
    try:
        if "mobile_sam" not in sys.modules:  # its __init__ imports the predictor (torchvision): skip it
            spec = importlib.util.find_spec("mobile_sam")
            package = importlib.util.module_from_spec(spec)
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["mobile_sam"] = package
        return types.SimpleNamespace(
            ms=importlib.import_module("mobile_sam.modeling"),
            evit=importlib.import_module("efficientsam.models.efficientvit.sam"),
            backbone=importlib.import_module("efficientsam.models.efficientvit.backbone"),
            norm=importlib.import_module("efficientsam.models.nn.norm"),
            esam=importlib.import_module("efficientsam.segment_anything.modeling"),
        )
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def reference_model(name: str, refs: types.SimpleNamespace) -> nn.Module:
    """The reference SAM of variant ``name``, built with the references' own classes."""
    spec = SAM_SPECS[name]
    e, s = spec.encoder, spec.image_size
    family = refs.ms if hasattr(e, "embed_dims") else refs.esam
    decoder = family.MaskDecoder(
        num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=spec.iou_head_hidden_dim,
        transformer=family.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=spec.decoder_mlp_dim, num_heads=8))
    if hasattr(e, "embed_dims"):  # MobileSAM: prompts and masks in the 1024 frame, like ours
        encoder = refs.ms.TinyViT(img_size=s, num_classes=e.num_classes, embed_dims=list(e.embed_dims),
                                  depths=list(e.depths), num_heads=list(e.num_heads), window_sizes=list(e.window_sizes),
                                  mlp_ratio=e.mlp_ratio, drop_path_rate=0.0, mbconv_expand_ratio=e.mbconv_expand_ratio)
        prompt = refs.ms.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(s, s),
                                       mask_in_chans=16)
        return refs.ms.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    backbone = refs.backbone.EfficientViTLargeBackbone(width_list=list(e.widths), depth_list=list(e.depths),
                                                       qkv_dim=e.head_dim)
    neck = refs.evit.SamNeck(fid_list=["stage4", "stage3", "stage2"], in_channel_list=list(reversed(e.widths[-3:])),
                             head_width=256, head_depth=e.neck_depth, expand_ratio=1, middle_op="fmb")
    # EfficientViT-SAM's prompt frame is 1024 while its encoder sees 512 (see _reference_boxes).
    prompt = refs.esam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                     mask_in_chans=16)
    model = refs.evit.EfficientViTSam(refs.evit.EfficientViTSamImageEncoder(backbone, neck), prompt, decoder,
                                      image_size=(1024, s))
    refs.norm.set_norm_eps(model, spec.norm_eps)  # as the release's model zoo does
    return model


# ----- one pair: ours and the reference, the same random weights --------------------------------


def randomised_state(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """``model``'s state with every constant-initialised float tensor replaced by random values."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.numel() > 1 and bool((value == value.flatten()[0]).all()):
            state[key] = value + 0.2 * torch.randn(value.shape, generator=gen)
    return state


def pair(name: str) -> tuple[nn.Module, nn.Module]:
    refs = references()
    ours, ref = build_sam_architecture(name), reference_model(name, refs)
    state = randomised_state(ours)
    ours.load_state_dict(state, strict=True)
    ref.load_state_dict(state, strict=True)  # the same keys and shapes: the official checkpoints load into ours
    # eval() only now: MobileSAM's reference caches its attention biases when switched to eval.
    return ours.eval(), ref.eval()


def scene(name: str) -> tuple[np.ndarray, object, Prompts]:
    """A seeded non-square picture (so resize and padding both act), its model input and frame,
    and two box prompts in original pixels."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:300, 0:420]
    image = ((np.sin(xx / 23.0) + np.cos(yy / 17.0)) * 60 + 128 + rng.normal(0, 12, (300, 420)))
    image[80:200, 120:300] += 70
    image = np.clip(image, 0, 255).astype(np.uint8)
    x, frame = preprocess(image, sam_preprocessing(name))
    prompts = Prompts.for_image(frame.original_hw, boxes=np.array([[110, 70, 310, 210], [20, 30, 90, 160]], np.float32))
    return x, frame, prompts


def reference_decode(ref: nn.Module, name: str, embedding: torch.Tensor, prompts: Prompts, frame) -> torch.Tensor:
    """The reference's own prompt encoder and mask decoder, single-mask output (K×1×256×256)."""
    coords, _ = prompts.encode(frame.scale_xy)
    boxes = torch.from_numpy(coords.reshape(-1, 4))
    if SAM_SPECS[name].image_size != 1024:
        # The reference normalises (b + 0.5) / 1024 in its 1024 prompt frame, ours (b + 0.5) / S in
        # the S-frame: 1024/S·b + (1024/S − 1)/2 gives the reference the same normalised point.
        r = 1024 / SAM_SPECS[name].image_size
        boxes = boxes * r + (r - 1) / 2
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=None, boxes=boxes, masks=None)
        low, _ = ref.mask_decoder(image_embeddings=embedding, image_pe=ref.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return low


def check_masks(ours_low: np.ndarray, ref_low: np.ndarray, frame, tol: float) -> None:
    """Low-res logits within ``tol``; final masks (the runtime's postprocess of each) may
    differ only at pixels whose reference logit is within ``tol`` of the threshold: the
    postprocess weights are ≥ 0 and sum to 1, so a logit error ≤ tol stays ≤ tol (plus the
    postprocess's own few-term rounding, f32_tol(M, 16))."""
    np.testing.assert_allclose(ours_low, ref_low, rtol=0, atol=tol)
    ref_logits = logits_to_original(ref_low, frame)
    band = tol + f32_tol(peak(ref_low), 16)
    differ = masks_from_logits(ours_low, frame) != (ref_logits > 0)
    assert not differ[np.abs(ref_logits) > band].any()
    assert (ref_logits > 0).any() and (ref_logits <= 0).any(), "a test mask must have both sides"


# ----- the tests ------------------------------------------------------------------------------

TINY = ("tiny_mobile_sam", "tiny_efficientvit")


@pytest.mark.parametrize("name", ["mobile_sam", "efficientvit_sam_l0", "efficientvit_sam_l1"])
def test_official_architectures_have_the_reference_keys(name):
    """The full-size variants' state dicts are the references' key for key and shape for shape."""
    refs = references()
    ours, ref = build_sam_architecture(name).state_dict(), reference_model(name, refs).state_dict()
    assert sorted(ours) == sorted(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


@pytest.mark.parametrize("name", TINY + ("mobile_sam", "efficientvit_sam_l0"))
def test_torch_embeddings_and_masks_match_the_reference(name):
    ours, ref = pair(name)
    x, frame, prompts = scene(name)
    with torch.no_grad():
        emb, emb_ref = ours.image_encoder(torch.from_numpy(x)), ref.image_encoder(torch.from_numpy(x))
    # One library, summation order only (SAME_LIBRARY); M = the largest embedding value; n =
    # the longest reduction behind it, the necks' 3×3 convolutions over 256 channels.
    np.testing.assert_allclose(emb.numpy(), emb_ref.numpy(), rtol=0, atol=f32_tol(peak(emb_ref), 9 * 256, SAME_LIBRARY))
    ref_low = reference_decode(ref, name, emb_ref, prompts, frame)
    with torch.no_grad():
        ours_low, _ = CASAM(ours).decode(emb_ref, prompts, frame.scale_xy)
    # Same embedding into both decoders; ours embeds prompts through its own path (other
    # fusions, hence CROSS_LIBRARY); n = the 64×64 image tokens the decoder attends over.
    check_masks(ours_low.numpy(), ref_low.numpy(), frame, f32_tol(peak(ref_low), 64 * 64, CROSS_LIBRARY))


def _onnx(module: nn.Module, spec, path) -> ort.InferenceSession:
    model = export_graph(module, spec, opset=18, max_prompts=8)
    path.write_bytes(model.SerializeToString())
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", TINY)
def test_exported_graphs_match_the_reference(name, tmp_path):
    """The exported encoder and decoder graphs, run by onnxruntime, against the reference in torch."""
    ours, ref = pair(name)
    x, frame, prompts = scene(name)
    with lean_encoder(ours.image_encoder):  # as casam-export traces it
        encoder = _onnx(ours.image_encoder, encoder_spec(SAM_SPECS[name].image_size), tmp_path / "encoder.onnx")
    (emb,) = encoder.run(None, {"image": x})
    with torch.no_grad():
        emb_ref = ref.image_encoder(torch.from_numpy(x))
    # torch against onnxruntime: CROSS_LIBRARY, n = 64×64 as test_export's fp32 parity.
    np.testing.assert_allclose(emb, emb_ref.numpy(), rtol=0, atol=f32_tol(peak(emb_ref), 64 * 64, CROSS_LIBRARY))
    decoder = _onnx(LeanPromptDecoder(ours), DECODER, tmp_path / "decoder.onnx")
    coords, labels = prompts.encode(frame.scale_xy)
    low, _ = decoder.run(None, {"embeddings": emb_ref.numpy(), "point_coords": coords, "point_labels": labels})
    ref_low = reference_decode(ref, name, emb_ref, prompts, frame)
    check_masks(low, ref_low.numpy(), frame, f32_tol(peak(ref_low), 64 * 64, CROSS_LIBRARY))
