"""Sessions side by side, as the interactive evaluation and casam-label's annotators run
them: encoder runs are serialised across sessions (one onnxruntime activation set at a time,
which bounds memory under load), and each session still gets its own masks."""

from __future__ import annotations

import copy

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from casam_io.intensity import Source
from casam_io.scan import Scan
from runtime.prompts import Prompts
from runtime.pipeline import Pipeline
from runtime.sessions import SessionOptions, SessionSource, SessionStore, StoreOptions


class CountingPipe:
    """The shared pipe, its encoder wrapped to record how many runs overlap (the fixture's
    Pipeline itself is never changed)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe, self.running, self.most = pipe, 0, 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def encode(self, x: np.ndarray) -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)  # widen the window in which a second run could overlap
            return self._pipe.encode(x)
        finally:
            with self._lock:
                self.running -= 1


def test_encoder_runs_of_concurrent_sessions_never_overlap(pipe):
    counting = CountingPipe(pipe)
    store = SessionStore(counting, StoreOptions(cache_mb=64, prefetch=False))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(4)]
    sessions = [store.create(SessionSource.open(Scan(Path(f"{i}.png"), im, Source(kind="image")), pipe.preprocessing),
                             options=SessionOptions(task="alpha")) for i, im in enumerate(images)]
    masks: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: masks.__setitem__(i, sessions[i].box("a", [10, 10, 60, 50]).mask))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.most == 1 and sorted(masks) == [0, 1, 2, 3]
    for i, image in enumerate(images):  # each session's own image, as if it had run alone
        alone = pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array([[10, 10, 60, 50]])), task="alpha")
        assert np.array_equal(masks[i], alone.masks[0])
    store.shutdown()


def _steps_after_box_and_click(pipe) -> list:
    store = SessionStore(pipe, StoreOptions(cache_mb=16, prefetch=False))
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    session = store.create(SessionSource.open(Scan(Path("x.png"), image, Source(kind="image")), pipe.preprocessing))
    session.box("a", [10, 10, 60, 50])
    session.click("a", 30, 30, True)
    steps = session.labels["a"].history(0).steps
    store.shutdown()
    return steps


def test_steps_keep_logits_only_for_a_decoder_that_reads_them(pipe, engines):
    """8 annotators × 200 steps of 256² float16 logits held ~200 MB that a decoder without
    ``mask_input`` never reads; such an export's steps keep none, and one with it keeps each."""
    assert pipe.capabilities.mask_input  # the shared test export has decoder_mask
    steps = _steps_after_box_and_click(pipe)
    assert len(steps) == 2 and all(step.logits is not None for step in steps)
    older = copy.deepcopy(pipe.manifest)
    older["graphs"].pop("decoder_mask")  # as an export from before decoder_mask
    without = Pipeline.from_manifest(engines, backend="ort-cpu", manifest=older)
    assert not without.capabilities.mask_input
    steps = _steps_after_box_and_click(without)
    assert len(steps) == 2 and all(step.logits is None for step in steps)
