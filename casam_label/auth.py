"""Who is calling: API keys and the client identity that owns sessions.

With ``--api-key`` set, every endpoint but the health probe needs one of the keys, as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A client is identified by the key
it presented (hashed, so the key itself is never kept beside the sessions), so clients
with different keys never see each other's sessions. Without keys the server binds to
localhost only (``casam-label`` refuses otherwise unless ``--insecure``) and every caller
is the same client.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Depends, HTTPException, Request

from casam_label.state import ServerState, server_state


def presented_key(request: Request) -> str:
    """The key in the request's headers, or ""."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key", "").strip()


def client_identity(request: Request, state: ServerState = Depends(server_state)) -> str:
    """The caller's identity (a FastAPI dependency); 401 without a valid key when keys are set."""
    keys = state.options.api_keys
    if not keys:
        return "local"
    given = presented_key(request)
    if not given or not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
        raise HTTPException(status_code=401, detail="missing or wrong API key: send Authorization: Bearer <key>")
    return hashlib.sha256(given.encode()).hexdigest()[:32]
