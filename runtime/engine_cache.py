"""A thread-safe LRU of loaded engines, for the per-task alignment graphs.

With dozens of tasks, keeping every alignment engine resident would cost memory for
graphs most images never route to. Engines load on first use, and the least recently used
one is dropped beyond ``max_resident``; a thread still running an evicted engine keeps its
own reference, so eviction never pulls an engine from under a prediction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class EngineCache(Generic[K, V]):
    def __init__(self, loader: Callable[[K], V], max_resident: int = 8) -> None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be ≥ 1, got {max_resident}")
        self.loader = loader
        self.max_resident = max_resident
        self.loads = 0
        self.evictions = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, threading.Lock] = {}

    def get(self, key: K) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        # Load outside the cache lock, so one slow load does not block hits on other keys,
        # and under a per-key lock, so two threads never load the same engine twice.
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            value = self.loader(key)
            with self._lock:
                self.loads += 1
                self._items[key] = value
                while len(self._items) > self.max_resident:
                    self._items.popitem(last=False)
                    self.evictions += 1
                return value

    def resident(self) -> list[K]:
        """Keys in least- to most-recently-used order."""
        with self._lock:
            return list(self._items)
