"""Training two synthetic tasks into one bundle (tiny SAM), shared by the tests below.

One module-scoped bundle keeps the suite fast: task "stripes" is trained, its files and
predictions are snapshotted, then task "dots" is added. Runs are short (few images, two
epochs, one mask per image) but use the real trainer end to end.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from casam_core.files import atomic_write_json, read_json
from casam_bundle import Bundle, BundleError
from models.bundle_models import build_model, load_vae
from trainer.calibration import calibrate
from trainer.data import load_dataset, load_images
from trainer.evaluate import predict_masks, rejection_rate, route_embeddings
from trainer.prompt_sampling import tight_boxes
from trainer.session import SessionOptions, open_bundle_session
from trainer.synthetic import write_synthetic_task
from trainer.train_task import TrainConfig, train_task
from trainer.vae_training import VAEConfig, single_thread
from models.pooling import attention_pool
from float32 import SAME_LIBRARY, vae_score_tol

CONFIG = TrainConfig(epochs=2, batch_size=2, lr=3e-4, masks_per_image=1, vae_epochs=60)
N_TRAIN, N_TEST = 12, 6


def make_task(root: Path, style: str) -> Path:
    """A synthetic task with a fixed split: N_TRAIN train and N_TEST held-out images."""
    write_synthetic_task(root, style, N_TRAIN + N_TEST, seed=3)
    stems = sorted(p.stem for p in (root / "images").iterdir())
    atomic_write_json(root / "split.json", {"train": stems[:N_TRAIN], "test": stems[N_TRAIN:]})
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def predictions(bundle: Bundle, sam, root: Path, cache_dir: Path) -> tuple[list[int], list[np.ndarray]]:
    """Routed masks of task stripes' test images under the bundle's current model."""
    session = open_bundle_session(bundle, SessionOptions(device="cpu", cache_dir=cache_dir, quiet=True, frozen_sam=sam))
    model = build_model(bundle, sam.model)
    samples = load_dataset(root).test
    emb = session.cache.embeddings(samples)
    routes, _ = route_embeddings(model, emb)
    masks = [predict_masks(model, emb[i], routes[i], tight_boxes(s.structures()), s.original_hw, bundle.preprocessing)
             for i, s in enumerate(samples)]
    return routes, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam):
    """Small runs on one thread: on two busy cores the thread hand-offs cost more than they give."""
    with single_thread():
        yield train_two_tasks(tmp_path_factory, tiny_sam)


def train_two_tasks(tmp_path_factory, tiny_sam) -> dict:
    base = tmp_path_factory.mktemp("train_tasks")
    cache = tmp_path_factory.getbasetemp() / "embedding_cache"  # shared with the other trainer tests
    data = {s: make_task(base / s, s) for s in ("stripes", "dots")}
    write_synthetic_task(base / "plasma", "plasma", 8, seed=9)
    bundle_dir = base / "bundle"
    kw = dict(config=CONFIG, session=SessionOptions(sam="tiny", device="cpu", cache_dir=cache, quiet=True,
                                                    frozen_sam=tiny_sam))
    first = train_task(bundle_dir, "stripes", data["stripes"], **kw)
    before_files = snapshot(bundle_dir / "tasks" / "stripes")
    before_preds = predictions(Bundle.open(bundle_dir), tiny_sam, data["stripes"], cache)
    second = train_task(bundle_dir, "dots", data["dots"], **kw)
    return {"base": base, "cache": cache, "data": data, "bundle_dir": bundle_dir, "summaries": [first, second],
            "before_files": before_files, "before_preds": before_preds, "kw": kw}


def test_training_lowers_loss_and_beats_identity(trained):
    bundle = Bundle.open(trained["bundle_dir"])
    for name in ("stripes", "dots"):
        log = read_json(bundle.task_dir(name) / "train_log.json")["epochs"]
        assert len(log) == CONFIG.epochs
        assert log[-1]["loss"] < log[0]["loss"], log
        m = bundle.task(name).metrics
        assert m["n_train"] == N_TRAIN and m["n_test"] == N_TEST
        assert m["test_iou"] > m["identity_iou"] + 0.02, m
    assert trained["summaries"][0]["final_loss"] < trained["summaries"][0]["first_loss"]


def test_routing_and_ood_rejection(trained, tiny_sam):
    bundle = Bundle.open(trained["bundle_dir"])
    session = open_bundle_session(bundle, SessionOptions(device="cpu", cache_dir=trained["cache"], quiet=True,
                                                         frozen_sam=tiny_sam))
    model = build_model(bundle, tiny_sam.model)
    correct, total = 0, 0
    for index, name in enumerate(bundle.task_names):
        test = load_dataset(trained["data"][name], split=bundle.load_split(name)).test
        routes, _ = route_embeddings(model, session.cache.embeddings(test))
        correct += sum(r == index for r in routes)
        total += len(routes)
    assert total == 2 * N_TEST
    assert correct / total >= 0.95
    plasma = load_images(trained["base"] / "plasma", bundle.preprocessing.intensity)
    rate, routes = rejection_rate(model, session.cache.embeddings(plasma))
    assert rate >= 0.9, routes


def test_threshold_is_numpy_percentile_of_held_out_scores(trained, tiny_sam):
    bundle = Bundle.open(trained["bundle_dir"])
    record = bundle.task("stripes")
    calib = bundle.load_calibration("stripes")
    scores = np.asarray(calib["scores"])
    assert len(scores) == calib["count"] == N_TRAIN
    assert record.threshold_key == "p97"
    # The same float64 numpy calls on the same scores (JSON keeps a float64 exactly): equal.
    assert record.threshold == float(np.percentile(scores, 97))
    assert calib["p95"] == float(np.percentile(scores, 95))
    assert calib["p99"] == float(np.percentile(scores, 99))
    assert calib["mean_plus_2std"] == scores.mean() + 2 * scores.std()
    # The held-out scores are reproducible from the same training features.
    session = open_bundle_session(bundle, SessionOptions(device="cpu", cache_dir=trained["cache"], quiet=True,
                                                         frozen_sam=tiny_sam))
    train = load_dataset(trained["data"]["stripes"], split=bundle.load_split("stripes")).train
    pooled = attention_pool(session.cache.embeddings(train).float())
    vae, again = calibrate(pooled, VAEConfig(epochs=CONFIG.vae_epochs, batch_size=CONFIG.batch_size), train_seed=CONFIG.seed)
    # Same data, seeds and kernels on one machine: equal up to summation order.
    np.testing.assert_allclose(again["scores"], scores, rtol=0, atol=vae_score_tol(scores, k=SAME_LIBRARY))
    # And the committed VAE is the final one, scored deterministically (z = μ).
    committed = load_vae(bundle, "stripes")
    torch.testing.assert_close(committed.score(pooled), vae.score(pooled), rtol=0,
                               atol=vae_score_tol(vae.score(pooled).detach(), k=SAME_LIBRARY))


def test_adding_a_task_leaves_earlier_tasks_unchanged(trained, tiny_sam):
    bundle = Bundle.open(trained["bundle_dir"])
    assert bundle.task_names == ["stripes", "dots"]
    assert snapshot(bundle.task_dir("stripes")) == trained["before_files"]
    routes_before, masks_before = trained["before_preds"]
    routes_after, masks_after = predictions(bundle, tiny_sam, trained["data"]["stripes"], trained["cache"])
    assert routes_before == routes_after and all(r == 0 for r in routes_after)
    for a, b in zip(masks_before, masks_after):
        np.testing.assert_array_equal(a, b)


def test_bundle_records_sam_hyperparameters_and_split(trained):
    meta = json.loads((trained["bundle_dir"] / "bundle.json").read_text())
    assert meta["sam"] == {"model": "tiny", "checkpoint_sha256": "untrained-tiny-seed-0", "untrained": True}
    task = meta["tasks"][0]
    assert task["hyperparameters"]["epochs"] == CONFIG.epochs and task["hyperparameters"]["lr"] == CONFIG.lr
    assert task["hyperparameters"]["resize"] == "longest"
    split = read_json(trained["bundle_dir"] / "tasks" / "stripes" / "split.json")
    assert len(split["train"]) == N_TRAIN and split["source"] == "split.json"
    assert not (trained["bundle_dir"] / ".staging" / "stripes").exists()


def test_task_name_reuse_needs_replace(trained):
    with pytest.raises(BundleError, match="--replace"):
        train_task(trained["bundle_dir"], "stripes", trained["data"]["stripes"], **trained["kw"])


def test_other_sam_checkpoint_is_refused(trained, tmp_path):
    from safetensors.torch import save_file

    from models.sam_loader import build_tiny_sam

    ckpt = tmp_path / "other_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_sam(seed=1).state_dict().items()}, str(ckpt))
    before = (trained["bundle_dir"] / "bundle.json").read_bytes()
    kw = dict(trained["kw"])
    own = replace(kw["session"], frozen_sam=None)
    with pytest.raises(BundleError, match="checkpoint sha256"):
        train_task(trained["bundle_dir"], "other", trained["data"]["dots"], config=kw["config"],
                   session=replace(own, checkpoint=ckpt))
    with pytest.raises(BundleError, match="trained with SAM 'tiny'"):
        train_task(trained["bundle_dir"], "other", trained["data"]["dots"], config=kw["config"],
                   session=replace(own, sam="vit_b"))
    assert (trained["bundle_dir"] / "bundle.json").read_bytes() == before
