"""The torch-free pipeline against the PyTorch CA-SAM model and plain SAM, on exported engines."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.backends import OrtBackend
from casam_core.errors import InputError
from runtime.manifest import Manifest
from runtime.pipeline import STAGES, Pipeline
from runtime.preprocess import Frame, boxes_to_frame, preprocess, resize_rgb
from runtime.prompts import Prompts
from runtime_support import BOXES, TASKS, exported, sample_images, with_thresholds
from casam_bundle import Bundle
from models.bundle_models import build_model
from float32 import CROSS_LIBRARY, f32_tol, peak, vae_score_tol


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline.from_manifest(engines[1], backend="ort-cpu")


@pytest.fixture(scope="module")
def model(engines, tiny_sam):
    return build_model(Bundle.open(engines[0]), tiny_sam.model)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def sam_masks(sam, low_res: torch.Tensor, frame) -> np.ndarray:
    """segment-anything's own torch post-processing, an independent check of the numpy one."""
    return (sam.postprocess_masks(low_res, frame.resized_hw, frame.original_hw) > 0)[:, 0].numpy()


@torch.no_grad()
def plain_sam(sam, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """segment-anything's own chain (what SamPredictor does; it needs torchvision, absent here):
    longest-side resize, sam.preprocess, its prompt encoder and mask decoder, sam.postprocess_masks."""
    h, w = image.shape[:2]
    scale = 1024 / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = resize_rgb(image, (rh, rw))
    x = sam.preprocess(torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float())
    box = torch.from_numpy(boxes * np.array([rw / w, rh / h, rw / w, rh / h], np.float32))
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
    low, iou = sam.mask_decoder(image_embeddings=sam.image_encoder(x), image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return sam_masks(sam, low, Frame((h, w), (rh, rw), 1024)), iou[:, 0].numpy()


def test_parity_with_pytorch_model(pipe, model, tiny_sam):
    images = sample_images()
    best = sorted(min(pipe.predict(img, Prompts.for_image(img.shape, boxes=BOXES[:1])).scores.values()) for img in images)
    tau = [(best[1] + best[2]) / 2] * 2  # half the images accept their best task, half go to identity
    routed = Pipeline(Manifest.load(pipe.manifest_obj.folder, with_thresholds(pipe.manifest, tau)), pipe.backend)
    model.thresholds.copy_(torch.tensor(tau))
    cases = [(image, None) for image in images] + [(images[0], "alpha"), (images[1], "beta")]
    routes = []
    for image, task in cases:
        result = routed.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task=task)
        x, frame = preprocess(image, routed.preprocessing)
        with torch.no_grad():
            out = model(torch.from_numpy(x), boxes=[torch.from_numpy(boxes_to_frame(BOXES, frame))], task=task)
        torch_route = "identity" if int(out.routes[0]) < 0 else TASKS[int(out.routes[0])]
        assert result.route == torch_route
        # onnxruntime's chain against torch's (encoder and router): see vae_score_tol.
        np.testing.assert_allclose(list(result.scores.values()), out.scores[0].numpy(), rtol=0,
                                   atol=vae_score_tol(out.scores[0]))
        expected = sam_masks(tiny_sam.model, out.masks[0], frame)
        assert result.masks.shape == expected.shape == (3, *image.shape[:2])
        for k in range(3):
            assert mask_iou(result.masks[k], expected[k]) >= 0.999
        # onnxruntime against torch; the longest sums run over 64×64 image tokens.
        np.testing.assert_allclose(result.iou, out.iou[0][:, 0].numpy(), rtol=0,
                                   atol=f32_tol(peak(out.iou), n=64 * 64, k=CROSS_LIBRARY))
        routes.append(result.route)
    assert routes.count("identity") == 2 and set(routes) == {"alpha", "beta", "identity"}


def test_identity_runs_no_alignment_and_equals_plain_sam(engines, tiny_sam):
    pipe = Pipeline.from_manifest(engines[1], backend="ort-cpu")
    image = sample_images()[0]
    forced = pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task="identity")
    rejecting = Pipeline(Manifest.load(engines[1], with_thresholds(pipe.manifest, [-1e9, -1e9])), pipe.backend)
    routed = rejecting.predict(image, Prompts.for_image(image.shape, boxes=BOXES))
    assert forced.route == routed.route == "identity"
    assert not [k for k in list(pipe.calls) + list(rejecting.calls) if k.startswith("align/")]
    assert pipe.align_engines.loads == rejecting.align_engines.loads == 0
    assert forced.timings_ms["align"] < 1.0

    masks, iou = plain_sam(tiny_sam.model, image, BOXES)
    for k in range(len(BOXES)):
        assert mask_iou(forced.masks[k], masks[k]) >= 0.999
        np.testing.assert_array_equal(forced.masks[k], routed.masks[k])
    np.testing.assert_allclose(forced.iou, iou, rtol=0, atol=f32_tol(peak(iou), n=64 * 64, k=CROSS_LIBRARY))

    pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task="alpha")
    assert pipe.calls["align/alpha"] == 1 and pipe.align_engines.loads == 1


def test_api_stages_match_predict(pipe):
    image = sample_images()[1]
    result = pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES[:2]))
    embedding, frame = pipe.embed(image)
    assert embedding.shape == (1, 256, 64, 64) and embedding.dtype == np.float32
    route, scores, thresholds = pipe.route(embedding)
    assert route == result.route and scores.shape == thresholds.shape == (2,)
    masks, low, iou = pipe.decode(embedding, frame, Prompts.for_image(image.shape, boxes=BOXES[:2]), route=route)
    np.testing.assert_array_equal(masks, result.masks)
    np.testing.assert_allclose(low, result.low_res_logits, rtol=0, atol=f32_tol(peak(low), n=64 * 64))
    batch, frames = pipe.embed_batch([image, sample_images()[2]])
    assert batch.shape == (2, 256, 64, 64) and frames[0] == frame
    # A batch of two changes the encoder's matmul blocking; sums over 64×64 tokens.
    np.testing.assert_allclose(batch[:1], embedding, rtol=0, atol=f32_tol(peak(embedding), n=64 * 64))
    assert set(result.timings_ms) == set(STAGES) and result.timings_ms["total"] > 0
    assert result.low_res_logits.shape == (2, 1, 256, 256) and result.iou.shape == (2,)
    with pytest.raises(InputError, match="unknown task"):
        pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task="gamma")


def test_points_and_boxes_with_points(pipe, model):
    image = sample_images()[0]
    points = np.array([[[120.0, 100.0], [40.0, 50.0]]], np.float32)
    labels = np.array([[1, 0]], np.float32)
    for boxes in (None, BOXES[:1]):
        result = pipe.predict(image, Prompts.for_image(image.shape, boxes=boxes, points=points, labels=labels), task="alpha")
        x, frame = preprocess(image, pipe.preprocessing)
        scale = np.array(frame.scale_xy, np.float32)
        with torch.no_grad():
            out = model(torch.from_numpy(x), boxes=None if boxes is None else [torch.from_numpy(boxes_to_frame(boxes, frame))],
                        points=[torch.from_numpy(points * scale)], point_labels=[torch.from_numpy(labels)], task="alpha")
        np.testing.assert_allclose(result.low_res_logits, out.masks[0].numpy(), rtol=0,
                                   atol=f32_tol(peak(out.masks[0]), n=64 * 64, k=CROSS_LIBRARY))


def test_prompts_beyond_max_prompts_are_split(engines, pipe):
    image = sample_images()[2]
    boxes = np.array([[5 + 3 * i, 5 + 2 * i, 120 + 5 * i, 150 + 4 * i] for i in range(5)], np.float32)
    small = Pipeline(Manifest.load(engines[1], {**pipe.manifest, "max_prompts": 2}), pipe.backend)
    split = small.predict(image, Prompts.for_image(image.shape, boxes=boxes), task="identity")
    assert small.calls["decoder"] == 3
    before = pipe.calls["decoder"]
    whole = pipe.predict(image, Prompts.for_image(image.shape, boxes=boxes), task="identity")
    assert pipe.calls["decoder"] - before == 1
    np.testing.assert_allclose(split.low_res_logits, whole.low_res_logits, rtol=0,
                               atol=f32_tol(peak(whole.low_res_logits), n=64 * 64))  # K=2 against K=5 calls
    np.testing.assert_array_equal(split.masks, whole.masks)


def test_io_binding_path_matches_plain_run(engines, pipe):
    bound = Pipeline(pipe.manifest_obj, OrtBackend("ort-cpu", io_binding=True))
    image = sample_images()[3]
    a = pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task="beta")
    b = bound.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task="beta")
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, rtol=0, atol=f32_tol(peak(a.low_res_logits), n=64 * 64))
    assert a.route == b.route == "beta"


def test_lru_eviction_and_preload(engines, pipe):
    lru = Pipeline(pipe.manifest_obj, pipe.backend, max_resident=1)
    image = sample_images()[1]
    results = [lru.predict(image, Prompts.for_image(image.shape, boxes=BOXES[:1]), task=t) for t in ("alpha", "beta", "alpha")]
    assert lru.align_engines.loads == 3 and lru.align_engines.evictions == 2
    assert lru.align_engines.resident() == ["alpha"]
    np.testing.assert_array_equal(results[0].low_res_logits, results[2].low_res_logits)
    assert not np.allclose(results[0].low_res_logits, results[1].low_res_logits)
    preloaded = Pipeline(pipe.manifest_obj, pipe.backend, max_resident=8, preload=True)
    assert preloaded.align_engines.resident() == list(TASKS)


# Opening a second whole chain (encoder, router, decoder, two layers) in a fresh process:
# how many threads it starts. The kind of pool is chosen once per process, hence a child.
THREAD_PROBE = """
import os, sys
sys.path.insert(0, {root!r})
from runtime.backends.ort import use_process_thread_pool
use_process_thread_pool({shared!r})
from runtime.backends import OrtBackend
from runtime.pipeline import Pipeline
Pipeline.from_manifest({engines!r}, backend="ort-cpu", preload=True)
before = len(os.listdir("/proc/self/task"))
Pipeline.from_manifest({engines!r}, backend="ort-cpu", preload=True)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_the_process_thread_pool_is_one_pool_for_every_session(engines):
    """use_process_thread_pool(True) (runtime/backends/ort.py) runs every session on one pool,
    whose spinning then competes with no other pool: a further chain starts no thread. By
    default each session has its own pool, one thread each beyond the caller's."""
    def new_threads(shared: bool) -> int:
        code = THREAD_PROBE.format(root=str(Path(__file__).resolve().parents[1]), shared=shared, engines=str(engines[1]))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(done.stdout.strip().splitlines()[-1])

    assert new_threads(True) == 0
    assert new_threads(False) >= 5


def test_concurrent_predictions_equal_sequential(pipe):
    # Sessions and the engine cache are shared by all threads.
    pipe = Pipeline(pipe.manifest_obj, OrtBackend("ort-cpu"), max_resident=1)
    images = sample_images()
    jobs = [(images[i % 4], BOXES[: 1 + i % 3], (None, "identity", "beta", "identity", "alpha")[i % 5]) for i in range(10)]
    expected = [pipe.predict(img, Prompts.for_image(img.shape, boxes=b), task=t) for img, b, t in jobs]
    got: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for j in range(len(jobs)):
                i = (j + 3 * w) % len(jobs)  # threads work on different jobs at the same time
                got[(w, i)] = pipe.predict(jobs[i][0], Prompts.for_image(np.shape(jobs[i][0]), boxes=jobs[i][1]), task=jobs[i][2])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 40
    for (w, i), result in got.items():
        assert result.route == expected[i].route
        np.testing.assert_array_equal(result.masks, expected[i].masks)
        np.testing.assert_allclose(result.low_res_logits, expected[i].low_res_logits, rtol=0,
                                   atol=f32_tol(peak(expected[i].low_res_logits), n=64 * 64))


def test_bad_prompts_raise_input_errors(pipe):
    image = sample_images()[0]  # 500 wide, 300 high
    cases = {
        "inverted": [[50, 50, 10, 80]],
        "zero area": [[50, 50, 50, 80]],
        "NaN": [[np.nan, 50, 60, 80]],
        "wholly outside": [[600, 10, 700, 50]],
    }
    for message, box in cases.items():
        with pytest.raises(InputError, match=message):
            pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array(box, np.float32)))
    with pytest.raises(InputError, match="at least one"):
        Prompts.for_image(image.shape)
    with pytest.raises(InputError, match="checked against a 500×300 image, not this 80×64 one"):
        pipe.predict(image[:64, :80], Prompts.for_image(image.shape, boxes=BOXES[:1]))
    with pytest.raises(InputError, match="outside"):
        pipe.predict(image, Prompts.for_image(image.shape, points=np.array([[[800.0, 10.0]]])))
    clipped = pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array([[-20, 100, 550, 280]], np.float32)), task="identity")
    inside = pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array([[0, 100, 500, 280]], np.float32)), task="identity")
    assert clipped.warnings and "clipped" in clipped.warnings[0]
    np.testing.assert_array_equal(clipped.masks, inside.masks)


def test_router_scores_match_numpy_pooling(pipe, model):
    """The router graph is the attention pooling + stacked VAEs: compare on a raw embedding."""
    embedding, _ = pipe.embed(sample_images()[0])
    with torch.no_grad():
        pooled, scores = model.router(torch.from_numpy(embedding))
    flat = embedding.reshape(256, -1).astype(np.float64)
    saliency = np.linalg.norm(flat, axis=0) / 256
    weights = np.exp(saliency - saliency.max())
    weights /= weights.sum()
    # float32 against float64: sums over 256 channels and 64×64 tokens of terms up to max |embedding|.
    np.testing.assert_allclose(pooled[0].numpy(), flat @ weights, rtol=0, atol=f32_tol(peak(flat), n=64 * 64))
    np.testing.assert_allclose(pipe.route(embedding)[1], scores[0].numpy(), rtol=0, atol=vae_score_tol(scores[0]))


def test_routing_rule_argmin_ties_and_threshold(engines, pipe):
    rule = Pipeline(Manifest.load(engines[1], with_thresholds(pipe.manifest, [2.0, 3.0])), pipe.backend)
    assert rule.choose(np.array([1.0, 1.0], np.float32)) == "alpha"  # tie → lower index
    assert rule.choose(np.array([2.5, 2.5], np.float32)) == "identity"  # alpha wins the tie but 2.5 > τ 2
    assert rule.choose(np.array([2.0, 5.0], np.float32)) == "alpha"  # score == τ accepts
    assert rule.choose(np.array([9.0, 3.0], np.float32)) == "beta"
    assert rule.choose(np.array([9.0, 3.0001], np.float32)) == "identity"
    assert rule.choose(np.array([9.0, 3.0], np.float32), task="alpha") == "alpha"
    assert rule.choose(np.array([0.0, 0.0], np.float32), task="identity") == "identity"
