"""The CASAM model: identity route equals plain SAM bit for bit; routing and forcing tasks."""

import numpy as np
import pytest
import torch

from models import CASAM, IDENTITY_INDEX, AlignmentLayer, Router, TaskVAE
from models.errors import ShapeError
from runtime.prompts import encode_prompts


@pytest.fixture(scope="module")
def sam():
    from models.sam_loader import load_frozen_sam

    return load_frozen_sam("tiny").model


@pytest.fixture(scope="module")
def embedding(sam):
    torch.manual_seed(0)
    with torch.no_grad():
        return sam.image_encoder(torch.randn(1, 3, 1024, 1024))


def _model(sam, thresholds=(1e9, 1e9)):
    torch.manual_seed(1)
    layers = [AlignmentLayer().eval(), AlignmentLayer().eval()]
    for layer in layers:
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return CASAM(sam, ["a", "b"], layers, Router([TaskVAE(), TaskVAE()]), list(thresholds)).eval()


BOXES = torch.tensor([[100.0, 120.0, 400.0, 500.0], [10.0, 10.0, 60.0, 90.0], [500.0, 0.0, 1000.0, 700.0]])


def test_identity_route_is_bit_identical_to_sam_boxes(sam, embedding):
    model = _model(sam)
    with torch.no_grad():
        out = model.forward_embeddings(embedding, boxes=[BOXES], task="identity")
        sparse, dense = sam.prompt_encoder(points=None, boxes=BOXES, masks=None)
        masks, iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert out.routes.tolist() == [IDENTITY_INDEX]
    assert torch.equal(out.masks[0], masks) and torch.equal(out.iou[0], iou)


def test_identity_route_is_bit_identical_to_sam_points_and_both(sam, embedding):
    model = _model(sam)
    pts = torch.tensor([[[200.0, 300.0], [250.0, 310.0]], [[30.0, 40.0], [35.0, 50.0]]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        for boxes in (None, BOXES[:2]):
            out = model.forward_embeddings(embedding, boxes=None if boxes is None else [boxes], points=[pts],
                                           point_labels=[labels], task="identity")
            sparse, dense = sam.prompt_encoder(points=(pts, labels), boxes=boxes, masks=None)
            masks, iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            assert torch.equal(out.masks[0], masks) and torch.equal(out.iou[0], iou)


def test_encode_prompts_layout_matches_sam():
    coords, labels = encode_prompts(points=np.array([[[5.0, 6.0]]]))
    assert coords.tolist() == [[[5.0, 6.0], [0.0, 0.0]]] and labels.tolist() == [[1.0, -1.0]]
    coords, labels = encode_prompts(boxes=np.array([[1.0, 2.0, 3.0, 4.0]]), points=np.array([[[5.0, 6.0]]]),
                                    labels=np.array([[0.0]]))
    assert coords.tolist() == [[[5.0, 6.0], [1.0, 2.0], [3.0, 4.0]]] and labels.tolist() == [[0.0, 2.0, 3.0]]


def test_routing_uses_argmin_and_threshold_and_forcing(sam):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 1024, 1024)
    model = _model(sam)
    with torch.no_grad():
        out = model(images, boxes=[BOXES[:1], BOXES[1:3]])
        expected = torch.argmin(out.scores, dim=1)
        assert out.routes.tolist() == expected.tolist()
        assert [m.shape for m in out.masks] == [(1, 1, 256, 256), (2, 1, 256, 256)]
        # Thresholds below every score: everything falls back to plain SAM.
        low = _model(sam, thresholds=(-1e9, -1e9))
        assert low(images, boxes=[BOXES[:1], BOXES[:1]]).routes.tolist() == [IDENTITY_INDEX, IDENTITY_INDEX]
        forced = model(images, boxes=[BOXES[:1], BOXES[:1]], task="b")
        assert forced.routes.tolist() == [1, 1]
        aligned = model.decoder(model.alignment[1](model.encode(images[:1])), *map(torch.from_numpy, encode_prompts(BOXES[:1].numpy())))
        assert torch.equal(forced.masks[0], aligned[0])
    with pytest.raises(ValueError, match="unknown task 'c'"):
        model(images[:1], boxes=[BOXES[:1]], task="c")


def test_model_rejects_bad_shapes(sam):
    model = _model(sam)
    with pytest.raises(ShapeError, match="B×3×1024×1024"):
        model(torch.zeros(1, 1024, 1024), boxes=[BOXES])
    with pytest.raises(ShapeError, match="must match"):
        CASAM(sam, ["a"], [], Router([]))
