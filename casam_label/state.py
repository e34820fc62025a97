"""What every endpoint of casam-label shares: the predictor, the sessions, the datastore, the limits.

The app keeps one ``ServerState`` in ``app.state.casam``; endpoint modules (the native API,
the MONAI Label API, the viewer) reach it through ``server_state(request)``, so each of
them is a router that knows nothing of how the server was started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import HTTPException, Request

from runtime.predictor import VolumePredictor
from runtime.sessions import SessionStore


@dataclass(frozen=True)
class ServerOptions:
    """Limits and security settings from the command line."""

    api_keys: tuple[str, ...] = ()  # empty: no key asked (localhost only, unless --insecure)
    max_upload_mb: int = 512
    max_files: int = 4096  # files in one upload (a DICOM series) or one zip
    default_axis: int = 2
    work_dir: Optional[Path] = None  # uploads are unpacked under it (a private temporary folder by default)
    default_task: Optional[str] = None  # --task: force one task (or "identity") for every session
    prefetch: int = 2  # slices on each side of a prompted one encoded in the background


@dataclass
class ServerState:
    """The server's shared objects; ``ready`` turns True once the engines are loaded."""

    pipe: Optional[VolumePredictor]  # None until the engines are loaded (then ``ready``)
    store: Optional[SessionStore]
    options: ServerOptions
    datastore: Any = None  # casam_label.datastore.Datastore, or None without --datastore
    ready: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


def server_state(request: Request) -> ServerState:
    """The app's ``ServerState`` (a FastAPI dependency)."""
    return request.app.state.casam


def ready_state(request: Request) -> ServerState:
    """The app's ``ServerState`` once the engines are loaded (a FastAPI dependency); 503 before."""
    state: ServerState = request.app.state.casam
    if not state.ready:
        raise HTTPException(status_code=503, detail="engines are still loading; retry when /ready says so")
    return state
