"""A previous mask (``mask_input``) through the decoder, end to end.

Interactive corrections re-run only the decoder with the box, every click so far and the
previous prediction's low-res logits, as segment-anything's ``SamPredictor`` does. The
PyTorch decoder must equal segment-anything's own modules bit for bit, the exported
``decoder_mask`` graph must match it within float32 rounding, the runtime must really feed
the mask (a correction changes the result), and exports made before the graph existed must
still load and refuse a mask_input with one line.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from casam_core.errors import InputError, ManifestError
from casam_export.graphs import DECODER, DECODER_MASK
from float32 import CROSS_LIBRARY, f32_tol, peak
from models import CASAM
from models.prompt_decoder import PromptDecoder
from runtime.backends.ort import OrtBackend
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline, UnverifiedExportWarning
from runtime.prompts import Prompts
from runtime_support import copy_engines, sample_images

FRAME = (1024, 1024)  # prompts made in the model frame: scale (1, 1)
BOXES = np.array([[100.0, 120.0, 400.0, 500.0], [10.0, 10.0, 60.0, 90.0]], np.float32)
POINTS = np.array([[[200.0, 300.0], [250.0, 310.0]], [[30.0, 40.0], [35.0, 50.0]]], np.float32)
LABELS = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)


@pytest.fixture(scope="module")
def embedding():
    torch.manual_seed(0)
    return torch.randn(1, 256, 64, 64)


def _previous(k: int, seed: int = 0) -> np.ndarray:
    """Logit-like previous masks: a blob of positive logits on a negative background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    masks = []
    for _ in range(k):
        cy, cx, r = rng.uniform(60, 200), rng.uniform(60, 200), rng.uniform(20, 60)
        masks.append(np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 8.0, -8.0) + rng.normal(0, 1, (256, 256)))
    return np.stack(masks)[:, None].astype(np.float32)


# ----- PyTorch: segment-anything's own arithmetic ----------------------------------------
def test_torch_decode_with_mask_input_equals_segment_anything(tiny_sam, embedding):
    """``SamPredictor.predict(mask_input=…)`` is ``predict_torch``: SAM's prompt encoder with
    ``masks=`` then its mask decoder, single-mask output. (SamPredictor itself cannot be
    imported here: its module needs torchvision, which casam never installs.)"""
    sam = tiny_sam.model
    model = CASAM(sam).eval()
    previous = _previous(2)
    cases = ((BOXES, None, None), (None, POINTS, LABELS), (BOXES, POINTS, LABELS))
    with torch.no_grad():
        for boxes, points, labels in cases:
            prompts = Prompts.for_image(FRAME, boxes, points, labels, mask_input=previous)
            low, iou = model.decode(embedding, prompts)
            sam_points = None if points is None else (torch.from_numpy(points), torch.from_numpy(labels))
            sparse, dense = sam.prompt_encoder(points=sam_points, boxes=None if boxes is None else torch.from_numpy(boxes),
                                               masks=torch.from_numpy(previous))
            ref, ref_iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            assert torch.equal(low, ref) and torch.equal(iou, ref_iou)
            without, _ = model.decode(embedding, Prompts.for_image(FRAME, boxes, points, labels))
            assert not torch.equal(low, without), "the previous mask must change the logits"


def test_torch_decoder_refuses_a_mask_input_of_the_wrong_shape(tiny_sam, embedding):
    from models.errors import ShapeError

    decoder = PromptDecoder(tiny_sam.model)
    coords, labels = Prompts.for_image(FRAME, BOXES).encode((1.0, 1.0))
    with pytest.raises(ShapeError, match="mask_input must be 2×1×256×256"):
        decoder(embedding, torch.from_numpy(coords), torch.from_numpy(labels), torch.zeros(1, 1, 256, 256))


# ----- the exported graph ----------------------------------------------------------------
def test_exported_decoder_mask_matches_torch(engines, tiny_sam):
    manifest = Manifest.load(engines, verify=False)
    entry = manifest.data["graphs"]["decoder_mask"]
    assert [t["name"] for t in entry["inputs"]] == [t.name for t in DECODER_MASK.inputs] == \
        ["embeddings", "point_coords", "point_labels", "mask_input"]
    assert entry["inputs"][3]["shape"] == ["prompts", 1, 256, 256]
    assert [t["name"] for t in manifest.data["graphs"]["decoder"]["inputs"]] == [t.name for t in DECODER.inputs]
    engine = OrtBackend("ort-cpu").load("decoder_mask", manifest.graphs["decoder_mask"].path)
    decoder = PromptDecoder(tiny_sam.model).eval()
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    for k, p in ((1, 1), (5, 4)):  # neither size was traced at export (2 prompts, 3 points)
        coords = rng.uniform(0, 1024, (k, p, 2)).astype(np.float32)
        labels = rng.integers(-1, 4, (k, p)).astype(np.float32)
        previous = _previous(k, seed=k)
        out = engine.run({"embeddings": emb, "point_coords": coords, "point_labels": labels, "mask_input": previous})
        with torch.no_grad():
            ref, ref_iou = decoder(*(torch.from_numpy(a) for a in (emb, coords, labels, previous)))
        # onnxruntime against torch; the longest sums run over the 64×64 image tokens (the
        # mask downscaling's convolutions sum over at most 16·4 terms).
        np.testing.assert_allclose(out["low_res_masks"], ref.numpy(), rtol=0,
                                   atol=f32_tol(peak(ref), n=64 * 64, k=CROSS_LIBRARY))
        np.testing.assert_allclose(out["iou_predictions"], ref_iou.numpy(), rtol=0,
                                   atol=f32_tol(peak(ref_iou), n=64 * 64, k=CROSS_LIBRARY))


# ----- the runtime -----------------------------------------------------------------------
def test_capability_and_describe_follow_the_graph(pipe):
    assert pipe.capabilities.mask_input and pipe.decoder_mask is not None
    assert pipe.describe()["mask_input"] is True


def test_a_correction_feeds_the_previous_mask(pipe, tiny_sam):
    """Box → prediction; then box + a click with the prediction's logits as mask_input: the
    runtime runs decoder_mask, equals PyTorch fed the same mask, and differs from the same
    prompts without the mask (a runtime that dropped or zeroed the mask fails here)."""
    image = sample_images()[1]
    emb, frame = pipe.embed(image)
    box = np.array([[40, 30, 220, 200]], np.float32)
    first = pipe.predict(image, Prompts.for_image(image.shape, boxes=box), task="identity")
    click = dict(boxes=box, points=np.array([[[100.0, 90.0]]]), labels=np.array([[0.0]]))
    before = pipe.calls["decoder_mask"]
    corrected = pipe.predict(image, Prompts.for_image(image.shape, **click, mask_input=first.low_res_logits),
                             task="identity")
    assert pipe.calls["decoder_mask"] == before + 1
    plain = pipe.predict(image, Prompts.for_image(image.shape, **click), task="identity")
    model = CASAM(tiny_sam.model).eval()
    emb_t = torch.from_numpy(np.asarray(emb))
    with torch.no_grad():
        ref, _ = model.decode(emb_t, Prompts.for_image(image.shape, **click, mask_input=first.low_res_logits),
                              frame.scale_xy)
        zeros, _ = model.decode(emb_t, Prompts.for_image(image.shape, **click, mask_input=np.zeros_like(first.low_res_logits)),
                                frame.scale_xy)
    tol = f32_tol(peak(ref), n=64 * 64, k=CROSS_LIBRARY)  # as in test_exported_decoder_mask_matches_torch
    np.testing.assert_allclose(corrected.low_res_logits, ref.numpy(), rtol=0, atol=tol)
    assert np.abs(zeros.numpy() - ref.numpy()).max() > 100 * tol, "a zero mask must not pass for the real one"
    assert np.abs(plain.low_res_logits - corrected.low_res_logits).max() > 100 * tol
    assert (plain.masks != corrected.masks).any(), "the previous mask must change the mask itself"


def test_mask_input_is_batched_by_max_prompts(pipe, engines):
    data = copy.deepcopy(pipe.manifest)
    data["max_prompts"] = 2
    small = Pipeline.from_manifest(engines, backend="ort-cpu", manifest=data, verify=False)
    image = sample_images()[0]
    emb, frame = small.embed(image)
    rng = np.random.default_rng(4)
    x0, y0 = rng.uniform(0, 200, 5), rng.uniform(0, 150, 5)
    boxes = np.stack([x0, y0, x0 + 150, y0 + 120], axis=1).astype(np.float32)
    prompts = Prompts.for_image(image.shape, boxes=boxes, mask_input=_previous(5, seed=9))
    _, low_small, iou_small = small.decode(emb, frame, prompts)
    assert small.calls["decoder_mask"] == 3 and small.calls["decoder"] == 0  # 2 + 2 + 1
    _, low_one, iou_one = pipe.decode(emb, frame, prompts)  # max_prompts 16: one call
    # The same graph on 2 prompts or 5: only the matmul blocking changes (one library).
    np.testing.assert_allclose(low_small, low_one, rtol=0, atol=f32_tol(peak(low_one), n=64 * 64))
    np.testing.assert_allclose(iou_small, iou_one, rtol=0, atol=f32_tol(peak(iou_one), n=64 * 64))


def test_an_export_without_decoder_mask_loads_and_refuses_mask_input_in_one_line(engines, tmp_path):
    old = copy_engines(engines, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    removed = manifest["graphs"].pop("decoder_mask")
    (old / removed["file"]).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UnverifiedExportWarning):
        pipe = Pipeline.from_manifest(old, backend="ort-cpu")  # every file hashed; none missing
    assert not pipe.capabilities.mask_input and pipe.describe()["mask_input"] is False
    image = np.zeros((40, 50), np.uint8)
    box = np.array([[1, 1, 20, 20]])
    with pytest.raises(InputError) as err:
        pipe.predict(image, Prompts.for_image(image.shape, boxes=box, mask_input=np.zeros((1, 1, 256, 256))))
    assert "takes no previous mask" in str(err.value) and "\n" not in str(err.value)
    assert pipe.predict(image, Prompts.for_image(image.shape, boxes=box)).masks.shape == (1, 40, 50)


def test_a_listed_decoder_mask_is_checked_like_every_graph(engines, tmp_path):
    broken = copy_engines(engines, tmp_path / "broken")
    manifest = json.loads((broken / "manifest.json").read_text())
    with open(broken / manifest["graphs"]["decoder_mask"]["file"], "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ManifestError, match="decoder_mask"):
        Manifest.load(broken)
    manifest["graphs"]["decoder_mask"]["sha256"] = 12
    shutil.rmtree(broken)
    with pytest.raises(ManifestError, match="decoder_mask"):
        Manifest.load(engines, manifest)


# ----- the export's parity check -----------------------------------------------------------
def test_parity_check_compares_corrections(engines, tiny_sam, tmp_path_factory, monkeypatch):
    """verify_export decodes each prompt set again with the first pass's logits as mask_input;
    a runtime that zeroed the mask (a decoder_mask chain that differs from PyTorch's) fails it."""
    from casam_bundle import Bundle
    from casam_export.parity import VerificationImages, synthetic_images
    from casam_export.verify import verify_export
    from runtime_support import exported

    bundle = Bundle.open(exported(tmp_path_factory)[0])
    manifest = json.loads((engines / "manifest.json").read_text())
    checks = VerificationImages((synthetic_images()[1],), "synthetic")  # one small image: every route on it
    report = verify_export(engines, manifest, bundle, tiny_sam.model, checks)
    assert report["passed"] and report["summary"]["mask_input_masks_compared"] > 0

    real = Pipeline._decoder_batches

    def zeroed(self, embedding, coords, labels, mask_input=None):
        return real(self, embedding, coords, labels, None if mask_input is None else np.zeros_like(mask_input))

    monkeypatch.setattr(Pipeline, "_decoder_batches", zeroed)
    broken = verify_export(engines, manifest, bundle, tiny_sam.model, checks)
    assert not broken["passed"] and any("mask IoU" in f for f in broken["failures"])
