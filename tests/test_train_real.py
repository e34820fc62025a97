"""Two real datasets (a few images each, tiny SAM, one epoch) train end to end and route apart.

The images are linked, not copied, into a temporary folder with a fixed split; the test is
skipped when ../shared/data/real is absent (a failure under CI=true).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import real_data_or_skip
from casam_core.files import atomic_write_json
from casam_bundle import Bundle
from models.bundle_models import build_model
from trainer.data import load_dataset
from trainer.evaluate import route_embeddings
from trainer.session import SessionOptions, open_bundle_session
from trainer.train_task import TrainConfig, train_task
from trainer.vae_training import single_thread

SETS = ("polyp_kvasir", "cxr_jsrt")
N_TRAIN, N_TEST = 20, 4
CONFIG = TrainConfig(epochs=1, batch_size=5, masks_per_image=1, vae_epochs=60)


def SESSION(cache, tiny_sam) -> SessionOptions:
    """The tiny SAM on the CPU with this test's embedding cache."""
    return SessionOptions(sam="tiny", device="cpu", cache_dir=cache, quiet=True, frozen_sam=tiny_sam)


def linked_subset(source: Path, target: Path) -> Path:
    masks = {p.stem: p for p in (source / "masks").iterdir()}
    images = [p for p in sorted((source / "images").iterdir()) if p.stem in masks][: N_TRAIN + N_TEST]
    for sub in ("images", "masks"):
        (target / sub).mkdir(parents=True)
    for image in images:
        (target / "images" / image.name).symlink_to(image)
        (target / "masks" / masks[image.stem].name).symlink_to(masks[image.stem])
    stems = [p.stem for p in images]
    atomic_write_json(target / "split.json", {"train": stems[:N_TRAIN], "test": stems[N_TRAIN:]})
    return target


@pytest.mark.real_data
def test_two_real_tasks_train_and_route_to_themselves(tmp_path, tiny_sam):
    real = real_data_or_skip(*SETS)
    bundle_dir, cache = tmp_path / "bundle", tmp_path / "cache"
    data = {name: linked_subset(real / name, tmp_path / name) for name in SETS}
    for name in SETS:
        with single_thread():  # small runs on busy cores: thread hand-offs cost more than they give
            summary = train_task(bundle_dir, name, data[name], config=CONFIG, session=SESSION(cache, tiny_sam))
        assert summary["metrics"]["n_train"] == N_TRAIN and summary["metrics"]["test_iou"] is not None
    bundle = Bundle.open(bundle_dir)
    session = open_bundle_session(bundle, SESSION(cache, tiny_sam))
    model = build_model(bundle, tiny_sam.model)
    for index, name in enumerate(SETS):
        test = load_dataset(data[name], split=bundle.load_split(name)).test
        routes, scores = route_embeddings(model, session.cache.embeddings(test))
        assert routes == [index] * N_TEST, (name, routes, scores, bundle.thresholds())
