"""Sharing encoder runs between concurrent requests.

The image encoder is nearly all of a prediction's cost, and on a GPU a batch of B images
costs far less than B single runs. Triton's own dynamic batcher cannot do this job here:
it only groups requests whose tensors have equal shapes (raw images rarely do), and in
PyTriton one failing request fails every request of its batch. So the model batches after
preprocessing, where every image is 1×3×S×S, and only the encoder call is shared.

There is no waiting window: a batch is whatever queued while the previous batch ran, so a
lone request never waits and a busy server fills batches by itself.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from concurrent.futures import Future
from typing import Callable, Optional

import numpy as np

from casam_core.errors import CasamError

_STOP = object()


class EncoderBatcher:
    """Runs ``encode`` (B×3×S×S → B×…) on up to ``max_batch`` queued inputs at a time."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], max_batch: int = 8) -> None:
        if max_batch < 1:
            raise CasamError(f"max batch must be at least 1, got {max_batch}")
        self._encode = encode
        self.max_batch = max_batch
        self.batch_sizes: Counter[int] = Counter()  # batch size → encoder runs, for logs and benchmarks
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="casam-encoder-batcher", daemon=True)
        self._worker.start()

    def encode(self, x: np.ndarray, timeout: Optional[float] = None) -> np.ndarray:
        """One preprocessed 1×3×S×S input → its 1×… embedding, from a shared encoder run."""
        future: "Future[np.ndarray]" = Future()
        with self._lock:
            if self._closed:
                raise CasamError("the encoder batcher is closed")
            self._queue.put((x, future))
        return future.result(timeout)

    def close(self) -> None:
        """Finish the queued work, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._worker.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            jobs = [item]
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                jobs.append(more)
            self._encode_jobs(jobs)  # type: ignore[arg-type]
            if stop:
                return

    def _encode_jobs(self, jobs: list[tuple[np.ndarray, "Future[np.ndarray]"]]) -> None:
        try:
            out = self._encode(np.concatenate([x for x, _ in jobs]))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for _, future in jobs:
                future.set_exception(exc)
            return
        self.batch_sizes[len(jobs)] += 1
        for i, (_, future) in enumerate(jobs):
            future.set_result(out[i : i + 1])
