"""MONAI Label's view of casam sessions: ids, expiry, and the session kept per datastore image.

A MONAI Label session id *is* the casam ``SessionStore`` id (unguessable, owned by the
client that made it). Beside it this registry keeps what MONAI's API adds: the per-session
``expiry`` a client may ask for (never longer than the store's idle timeout), the times
MONAI's ``session_info`` reports, and the last ROI per label (a viewer resends it with
every click). An ``image=ID`` infer without a session opens one on the datastore image on
demand and keeps it for that client, so the encoder runs once per image there too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from casam_core.errors import SessionError
from casam_io.scan import Scan
from runtime.sessions import Session, SessionSource
from casam_label.state import ServerState
from casam_label.uploads import cleaned_up_on_refusal


@dataclass
class MonaiSession:
    session_id: str
    owner: str
    name: str  # the uploaded file's name or the datastore image id, for session_info
    created: float
    expiry: float  # seconds idle before it goes (the store's own idle timeout still applies)
    last_access: float = 0.0
    image_id: Optional[str] = None
    last_roi: dict[str, Any] = field(default_factory=dict)  # label → the ROI last drawn

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``SessionInfo`` fields."""
        return {"name": self.session_id, "path": "", "image": self.name, "meta": {"casam": True},
                "create_ts": int(self.created), "last_access_ts": int(self.last_access), "expiry": int(self.expiry)}


class MonaiSessions:
    """The registry, kept in ``ServerState.extras["monai_sessions"]``."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._meta: dict[str, MonaiSession] = {}
        self._by_image: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, state: ServerState) -> "MonaiSessions":
        with _CREATE:
            found = state.extras.get("monai_sessions")
            if found is None:
                found = state.extras["monai_sessions"] = cls(state)
            return found

    def _timeout(self, expiry: int) -> float:
        idle = float(self.state.store.options.idle_timeout_s)
        return idle if expiry <= 0 else min(float(expiry), idle)

    def open(self, scan: Scan, owner: str, name: str, expiry: int = 0, image_id: Optional[str] = None,
             cleanup: Optional[Callable[[], None]] = None) -> MonaiSession:
        """A new casam session on ``scan`` for ``owner``, registered for MONAI's API;
        ``cleanup`` (an upload's, ``casam_label.uploads``) runs when the session ends, or now
        if the session is refused."""
        self.prune()
        with cleaned_up_on_refusal(cleanup):
            source = SessionSource.open(scan, self.state.pipe.preprocessing, self.state.options.default_axis)
            source.cleanup = cleanup
            session = self.state.store.create(source, owner)
        now = time.time()
        meta = MonaiSession(session.id, owner, name, now, self._timeout(expiry), now, image_id)
        with self._lock:
            self._meta[session.id] = meta
            if image_id is not None:
                self._by_image[(owner, image_id)] = session.id
        return meta

    def prune(self) -> None:
        """Close the sessions idle past their own expiry (each costs its embeddings)."""
        now = time.time()
        with self._lock:
            stale = [m for m in self._meta.values() if now - m.last_access > m.expiry]
        for meta in stale:
            self.close(meta.session_id, meta.owner)

    def get(self, session_id: str, owner: str) -> tuple[Session, MonaiSession]:
        """The owner's live session; one error for unknown, expired, closed or foreign ids."""
        session = self.state.store.get(session_id, owner)  # raises for unknown and foreign ids
        with self._lock:
            meta = self._meta.get(session_id)
        now = time.time()
        if meta is None or now - meta.last_access > meta.expiry:
            self.close(session_id, owner)
            raise SessionError("no such session: it expired, was closed, or never existed; open a new one")
        meta.last_access = now
        return session, meta

    def for_image(self, image_id: str, owner: str) -> Optional[tuple[Session, MonaiSession]]:
        """The session kept on datastore image ``image_id`` for ``owner``, if still alive."""
        with self._lock:
            sid = self._by_image.get((owner, image_id))
        if sid is None:
            return None
        try:
            return self.get(sid, owner)
        except SessionError:
            return None

    def close(self, session_id: str, owner: str) -> Optional[MonaiSession]:
        """Forget and close the owner's session (another owner's is left alone)."""
        with self._lock:
            meta = self._meta.get(session_id)
            if meta is None or meta.owner != owner:
                meta = None
            else:
                del self._meta[session_id]
                if meta.image_id is not None:
                    self._by_image.pop((meta.owner, meta.image_id), None)
        try:
            self.state.store.close(session_id, owner)
        except SessionError:
            pass  # the store already expired it
        return meta


_CREATE = threading.Lock()
