"""Interactive sessions (runtime/sessions): encoder once per image, decoder per prompt,
undo, propagation equal to casam-infer's volume mode, a bounded shared cache, and a store
that never hands a session to the wrong client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from casam_core.errors import InputError, SessionError, SessionLimitError
from casam_io.readers import read
from runtime.preprocess import preprocess
from runtime.prompts import Prompts
from runtime.sessions import SessionOptions, SessionSource, SessionStore, StoreOptions
from runtime.volume import Propagation, segment_volume


@pytest.fixture(scope="module")
def anatomical():
    pytest.importorskip("nibabel")
    from nibabel.testing import data_path

    return read(Path(data_path) / "anatomical.nii")  # a real 33×41×25 int16 MR volume


def picture() -> np.ndarray:
    yy, xx = np.mgrid[0:120, 0:160]
    disc = ((xx - 80) ** 2 + (yy - 60) ** 2 < 30 ** 2)
    return np.stack([disc * 200 + 20, xx, yy], axis=-1).astype(np.uint8)


def image_source(pipe, image: np.ndarray) -> SessionSource:
    from casam_io.intensity import Source
    from casam_io.scan import Scan

    return SessionSource.open(Scan(Path("picture.png"), image, Source(kind="image")), pipe.preprocessing)


def encoder_runs(pipe) -> int:
    return pipe.calls["encoder"]


def test_an_image_is_encoded_once_and_each_prompt_runs_the_decoder_alone(pipe):
    image = picture()
    store = SessionStore(pipe, StoreOptions(cache_mb=64, prefetch=False))
    session = store.create(image_source(pipe, image))
    before = encoder_runs(pipe)
    first = session.box("organ", [40, 20, 120, 100])
    second = session.click("organ", 80, 60, positive=True)
    third = session.box("other", [10, 10, 60, 60])
    assert encoder_runs(pipe) - before == 1  # one encoder run for three prompts
    # The session's box is the one-shot predictor's box, bit for bit (same engines, same frame).
    expected = pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array([[40, 20, 120, 100]])))
    assert np.array_equal(first.mask, expected.masks[0])
    assert first.route.route == expected.route and first.route.mode == "image"
    assert second.mask.shape == third.mask.shape == image.shape[:2]
    assert first.timings_ms["embedding"] > 0 and second.timings_ms["decoder"] > 0
    store.shutdown()


def test_clicks_refine_and_undo_restores_the_step_before(pipe):
    store = SessionStore(pipe, StoreOptions(cache_mb=64, prefetch=False))
    session = store.create(image_source(pipe, picture()))
    boxed = session.box("organ", [40, 20, 120, 100]).mask.copy()
    clicked = session.click("organ", 80, 60, positive=False)
    assert clicked.undo_depth == 2
    assert not np.array_equal(clicked.mask, boxed)  # the negative click in the middle changed it
    undone = session.undo("organ")
    assert undone.undo_depth == 1 and np.array_equal(undone.mask, boxed)
    assert session.undo("organ").mask is None  # nothing left: the slice is empty again
    with pytest.raises(InputError, match="outside"):
        session.click("organ", 500, 60)
    with pytest.raises(InputError, match="label name"):
        session.box("../x", [1, 1, 5, 5])
    store.shutdown()


def test_propagate_equals_casam_infers_volume_mode(pipe, anatomical):
    """Same box on slice 12, same walk, same (forced) route → the same label volume."""
    store = SessionStore(pipe, StoreOptions(cache_mb=256, prefetch=False))
    source = SessionSource.open(anatomical, pipe.preprocessing, axis=2)
    session = store.create(source, options=SessionOptions(task="alpha"))
    box = [6, 6, 26, 34]
    session.box("lesion", box, 12)
    moved = session.propagate("lesion", 12)
    prompts = Prompts.for_volume(anatomical.data.shape, axis=2, boxes=np.array([box]), slice=12)
    reference = segment_volume(pipe, anatomical, prompts, task="alpha", settings=Propagation())
    assert len(moved.masks) > 1  # it walked
    assert np.array_equal(session.label_map(), reference.labels)
    store.shutdown()


def test_a_volume_takes_one_route_from_the_prompted_neighbourhood(pipe, anatomical):
    store = SessionStore(pipe, StoreOptions(cache_mb=256, prefetch=False))
    session = store.create(SessionSource.open(anatomical, pipe.preprocessing, axis=2),
                           options=SessionOptions(route_neighbours=2))
    first = session.box("a", [6, 6, 26, 34], 12)
    later = session.box("a", [6, 6, 26, 34], 3)
    assert first.route is later.route and first.route.mode == "volume"
    assert first.route.slices == (10, 11, 12, 13, 14)
    scores = np.stack([pipe.route(pipe.encode(preprocess(session.source.image(j), pipe.preprocessing)[0]))[1]
                       for j in range(10, 15)]).mean(axis=0)
    assert list(first.route.scores.values()) == pytest.approx(list(scores), rel=0, abs=0)
    store.shutdown()


def test_the_cache_holds_its_budget_and_a_re_encoded_slice_gives_the_same_mask(pipe, anatomical):
    store = SessionStore(pipe, StoreOptions(cache_mb=4, prefetch=False))  # room for one embedding
    session = store.create(SessionSource.open(anatomical, pipe.preprocessing, axis=2),
                           options=SessionOptions(route_neighbours=0))
    first = session.box("a", [6, 6, 26, 34], 12).mask.copy()
    session.box("a", [6, 6, 26, 34], 5)
    assert len(store.cache) == 1 and store.cache.held_bytes <= 4 << 20
    before = encoder_runs(pipe)
    again = session.box("a", [6, 6, 26, 34], 12).mask
    assert encoder_runs(pipe) - before == 1  # slice 12 was evicted and encoded again
    assert np.array_equal(again, first)
    store.shutdown()


def test_background_prefetch_encodes_the_neighbours(pipe, anatomical):
    store = SessionStore(pipe, StoreOptions(cache_mb=256, prefetch=True))
    session = store.create(SessionSource.open(anatomical, pipe.preprocessing, axis=2),
                           options=SessionOptions(route_neighbours=0, prefetch=2))
    session.box("a", [6, 6, 26, 34], 12)
    store.executor.submit(lambda: None).result(timeout=120)  # one worker: earlier jobs are done
    assert all((session.id, j) in store.cache for j in (10, 11, 13, 14))
    store.shutdown()


def test_the_store_refuses_unknown_foreign_expired_and_excess_sessions(pipe):
    now = [0.0]
    store = SessionStore(pipe, StoreOptions(cache_mb=16, idle_timeout_s=60, max_sessions=2, prefetch=False),
                         clock=lambda: now[0])
    mine = store.create(image_source(pipe, picture()), owner="alice")
    assert store.get(mine.id, "alice") is mine
    with pytest.raises(SessionError) as foreign:
        store.get(mine.id, "bob")
    with pytest.raises(SessionError) as unknown:
        store.get("no-such-session", "alice")
    assert str(foreign.value) == str(unknown.value)  # a foreign id reads exactly like an unknown one
    store.create(image_source(pipe, picture()), owner="bob")
    with pytest.raises(SessionLimitError):
        store.create(image_source(pipe, picture()), owner="carol")
    now[0] = 61.0
    with pytest.raises(SessionError):
        store.get(mine.id, "alice")  # idle past the timeout: gone
    assert len(store) == 0
    assert len(mine.id) >= 32
    store.shutdown()


def test_a_label_map_stacks_labels_with_lower_indices_first(pipe):
    store = SessionStore(pipe, StoreOptions(cache_mb=16, prefetch=False))
    session = store.create(image_source(pipe, picture()))
    a = session.box("a", [40, 20, 120, 100]).mask
    b = session.box("b", [10, 10, 90, 70]).mask
    labels = session.label_map()
    assert np.array_equal(labels == 1, a)
    assert np.array_equal(labels == 2, b & ~a)
    session.reset("a")
    assert not (session.label_map() == 1).any()
    with pytest.raises(InputError):
        session.reset("a")
    store.shutdown()


def test_undo_history_is_bounded_and_masks_survive_packing():
    from runtime.sessions.history import LOGIT_STEPS, MAX_UNDO, SliceHistory, Step

    rng = np.random.default_rng(0)
    history = SliceHistory()
    masks = [rng.random((37, 53)) > 0.5 for _ in range(MAX_UNDO + 5)]
    for m in masks:
        history.push(Step.make(None, (), (), m, np.zeros((1, 1, 256, 256), np.float32)))
    assert len(history.steps) == MAX_UNDO  # the oldest steps are forgotten
    assert np.array_equal(history.current.mask, masks[-1])  # bit-packing is lossless, odd sizes included
    assert np.array_equal(history.undo().mask, masks[-2])
    # Only the newest LOGIT_STEPS steps hold logits (mask_input); older ones decode from prompts.
    assert [s.logits is not None for s in history.steps] == [False] * (MAX_UNDO - LOGIT_STEPS) + [True] * (LOGIT_STEPS - 1)
    for _ in range(LOGIT_STEPS - 1):
        assert history.current.mask_input is not None and history.current.mask_input.dtype == np.float32
        history.undo()
    assert history.current.mask_input is None and np.array_equal(history.current.mask, masks[-1 - LOGIT_STEPS])
