"""The aligned-embedding cache that every session shares, under one memory budget.

One aligned embedding is 256×64×64 float32, 4 MiB. A volume visited slice by slice by
several annotators would hold hundreds of them, so the cache is a least-recently-used map
bounded in bytes (``casam-label --cache-mb``), shared by all sessions: an idle session's
slices make room for an active one's. An evicted slice is re-encoded on its next use,
which costs time, never correctness.

Encodes of the same slice are deduplicated: a prompt that arrives while the background
prefetch is encoding its slice waits for that encode instead of starting a second one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

from casam_core.errors import InputError
from runtime.preprocess import Frame


@dataclass(frozen=True)
class SliceEmbedding:
    """One image's (or slice's) aligned embedding and where the image sits in the model frame."""

    aligned: np.ndarray  # 1×256×64×64 float32, after the route's alignment layer
    frame: Frame

    @property
    def nbytes(self) -> int:
        return int(self.aligned.nbytes)


class _Pending:
    """An encode in progress: later callers wait on ``done`` for its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: SliceEmbedding | None = None
        self.error: BaseException | None = None


class EmbeddingCache:
    """LRU of ``SliceEmbedding`` keyed by (session id, slice), at most ``budget_bytes`` in all."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 4 << 20:
            raise InputError(f"the embedding cache needs at least 4 MB (one embedding), got {budget_bytes >> 20} MB")
        self.budget = int(budget_bytes)
        self._items: OrderedDict[Hashable, SliceEmbedding] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        self._held = 0
        self._lock = threading.Lock()
        # One encoder run at a time across all sessions: on a small CPU a second run in
        # parallel only slows the first, and each concurrent run holds its own activations in
        # onnxruntime's arena (8 annotators' parallel encodes grew RSS by ~300 MB).
        self.encode_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def held_bytes(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable, compute: Callable[[], SliceEmbedding]) -> SliceEmbedding:
        """The cached value for ``key``, or ``compute()``'s, computed once however many callers ask."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
                self.misses += 1
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.value is not None
            return pending.value
        return self._compute(key, pending, compute)

    def _compute(self, key: Hashable, pending: _Pending, compute: Callable[[], SliceEmbedding]) -> SliceEmbedding:
        try:
            value = compute()
        except BaseException as exc:
            pending.error = exc
            raise
        else:
            pending.value = value
            self._put(key, value)
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set()

    def _put(self, key: Hashable, value: SliceEmbedding) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._held -= old.nbytes
            self._items[key] = value
            self._held += value.nbytes
            while self._held > self.budget and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._held -= evicted.nbytes

    def drop(self, owner: Hashable) -> int:
        """Forget every entry of one session (keys ``(owner, …)``); returns how many."""
        with self._lock:
            keys = [k for k in self._items if isinstance(k, tuple) and k and k[0] == owner]
            for k in keys:
                self._held -= self._items.pop(k).nbytes
            return len(keys)
