"""The sessions of one server: unguessable ids, owners, idle expiry, a count limit, one cache.

Ids come from ``secrets`` (192 bits), so they cannot be guessed, and each session records
its owner (the client identity the server derived, e.g. from its API key): asking for
another owner's session reads exactly like asking for one that does not exist, so an id
seen in a log grants nothing. Idle sessions expire after ``idle_timeout_s`` and free their
embeddings. Background prefetch runs on one shared worker thread: on a small CPU a second
encoder run in parallel only slows the one a user waits for.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from casam_core.errors import SessionError, SessionLimitError
from runtime.predictor import VolumePredictor
from runtime.sessions.embedding_cache import EmbeddingCache
from runtime.sessions.session import Session, SessionOptions
from runtime.sessions.source import SessionSource


@dataclass(frozen=True)
class StoreOptions:
    """``cache_mb``: the shared embedding budget; ``idle_timeout_s``: a session unused that
    long is gone; ``max_sessions``: open sessions at once; ``prefetch``: background encodes."""

    cache_mb: int = 1024
    idle_timeout_s: float = 1800.0
    max_sessions: int = 32
    prefetch: bool = True


@dataclass
class _Entry:
    session: Session
    owner: str
    last_used: float


class SessionStore:
    """Creates, finds and expires sessions on one predictor."""

    def __init__(self, pipe: VolumePredictor, options: StoreOptions = StoreOptions(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pipe, self.options, self.clock = pipe, options, clock
        self.cache = EmbeddingCache(int(options.cache_mb) << 20)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casam-prefetch") \
            if options.prefetch else None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def create(self, source: SessionSource, owner: str = "", options: SessionOptions = SessionOptions()) -> Session:
        """A new session on ``source`` for ``owner``; refused over ``max_sessions``."""
        self.expire()
        with self._lock:
            if len(self._entries) >= self.options.max_sessions:
                raise SessionLimitError(f"the server holds its limit of {self.options.max_sessions} sessions; "
                                        "close one (DELETE) or wait for idle ones to expire")
            session_id = secrets.token_urlsafe(24)
            session = Session(session_id, source, self.pipe, self.cache, options, self.executor)
            self._entries[session_id] = _Entry(session, owner, self.clock())
            return session

    def get(self, session_id: str, owner: str = "") -> Session:
        """The owner's live session ``session_id``; unknown, expired and foreign ids are one error."""
        self.expire()
        with self._lock:
            entry = self._entries.get(session_id) if isinstance(session_id, str) else None
            if entry is None or not secrets.compare_digest(entry.owner, owner):
                raise SessionError("no such session: it expired, was closed, or never existed; open a new one")
            entry.last_used = self.clock()
            return entry.session

    def close(self, session_id: str, owner: str = "") -> None:
        session = self.get(session_id, owner)
        with self._lock:
            self._entries.pop(session_id, None)
        session.close()

    def expire(self) -> int:
        """Close sessions idle longer than ``idle_timeout_s``; returns how many."""
        now = self.clock()
        with self._lock:
            old = [sid for sid, e in self._entries.items() if now - e.last_used > self.options.idle_timeout_s]
            gone = [self._entries.pop(sid).session for sid in old]
        for session in gone:
            session.close()
        return len(gone)

    def shutdown(self) -> None:
        """Close every session and stop the prefetch worker."""
        with self._lock:
            gone = [e.session for e in self._entries.values()]
            self._entries.clear()
        for session in gone:
            session.close()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
