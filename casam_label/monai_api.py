"""MONAI Label's REST API on casam, for 3D Slicer's MONAI Label module and OHIF's extension.

Endpoints (shapes as MONAI Label 0.8.5's server and its ``MONAILabelClient`` use them):
``GET /info/``; ``PUT /session/``, ``GET`` and ``DELETE /session/{id}``;
``POST /infer/{model}``; the datastore routes (``casam_label.monai_datastore``); and
``GET /auth/`` plus ``POST /auth/token``, so a viewer that logs in can present an
``--api-key`` as its password. Training, active learning and scoring are not offered
(``/info/`` lists none, so the viewers hide those panels).
"""

from __future__ import annotations

import secrets
from typing import List, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from casam_label.auth import client_identity
from casam_label.monai_datastore import READ, client_name, datastore_status, router as datastore_router, scan_of_image
from casam_label.monai_info import app_info
from casam_label.monai_infer import first_label
from casam_label.monai_infer import check_model, run_infer
from casam_label.monai_prompts import parse_params
from casam_label.monai_sessions import MonaiSessions
from casam_label.uploads import UploadLimits, scan_from_files
from casam_label.state import ServerState, ready_state as ready, server_state

router = APIRouter(tags=["MONAI Label"])
router.include_router(datastore_router)


def _open_upload(state: ServerState, sessions: MonaiSessions, file: UploadFile, owner: str, expiry: int = 0):
    """An uploaded file → a session (through ``casam_label.uploads``, as the native API's)."""
    scan, cleanup = scan_from_files([(client_name(file), file.file)], UploadLimits.of(state.options),
                                    state.options.work_dir, READ)
    return sessions.open(scan, owner, client_name(file) or "upload", expiry, cleanup=cleanup)


@router.get("/info/")
def info(state: ServerState = Depends(ready), _: str = Depends(client_identity)) -> dict:
    return app_info(state, datastore_status(state))


@router.put("/session/")
async def create_session(expiry: int = 0, uncompress: bool = False, files: List[UploadFile] = File(...),
                         form_expiry: int = Form(0, alias="expiry"),
                         state: ServerState = Depends(ready), owner: str = Depends(client_identity)) -> dict:
    """One uploaded image or volume → a session (``expiry``: idle seconds, capped by the server's).
    MONAI Label's server reads ``expiry`` from the query, its Python client sends it as a form
    field beside the file: either is taken."""
    expiry = expiry or form_expiry
    if uncompress or len(files) != 1:
        raise HTTPException(400, "send one image file (NIfTI, DICOM file, PNG, JPEG, TIFF); "
                                 "zips and multi-file series go through the native API (POST /api/sessions)")
    meta = await run_in_threadpool(_open_upload, state, MonaiSessions.of(state), files[0], owner, expiry)
    return {"session_id": meta.session_id, "session_info": meta.info()}


@router.get("/session/{session_id}")
def get_session(session_id: str, state: ServerState = Depends(ready), owner: str = Depends(client_identity)) -> dict:
    _, meta = MonaiSessions.of(state).get(session_id, owner)
    return meta.info()


@router.delete("/session/{session_id}")
def remove_session(session_id: str, state: ServerState = Depends(ready),
                   owner: str = Depends(client_identity)) -> dict:
    sessions = MonaiSessions.of(state)
    _, meta = sessions.get(session_id, owner)
    sessions.close(session_id, owner)
    return meta.info()


@router.post("/infer/{model}")
async def infer(model: str, image: str = "", session_id: str = "", output: Optional[str] = None,
                params: str = Form("{}"), file: Optional[UploadFile] = File(None),
                state: ServerState = Depends(ready), owner: str = Depends(client_identity)) -> Response:
    """Clicks and a ROI on a session, a datastore image or an uploaded file → the label."""
    check_model(model)
    if output not in (None, "all", "image", "json"):
        raise HTTPException(400, f"output {output!r} is not offered: use all, image or json")
    request = parse_params(params)
    sessions = MonaiSessions.of(state)
    if session_id:
        session, meta = sessions.get(session_id, owner)
    elif image:
        found = sessions.for_image(image, owner)
        if found is None:
            meta = sessions.open(scan_of_image(state, image), owner, image, image_id=image)
            found = sessions.get(meta.session_id, owner)
        session, meta = found
    elif file is not None:
        meta = await run_in_threadpool(_open_upload, state, sessions, file, owner)
        session, _ = sessions.get(meta.session_id, owner)
        try:
            return run_infer(session, None, request, output, first_label(state))
        finally:
            sessions.close(meta.session_id, owner)
    else:
        raise HTTPException(400, "give session_id, image (a datastore id) or a file to segment")
    return run_infer(session, meta, request, output, first_label(state))


@router.get("/auth/")
def auth_enabled(state: ServerState = Depends(server_state)) -> dict:
    """Whether a viewer must log in: with ``--api-key`` set, its password is the key."""
    return {"enabled": bool(state.options.api_keys), "client_id": "casam-label", "realm": "casam"}


@router.get("/auth/token/valid")
def auth_token_valid(_: str = Depends(client_identity)) -> dict:
    """200 while the viewer's token (the API key) is one of the server's, else 401: MONAI
    Label's viewers check a kept token with this before they ask to log in again."""
    return {"valid": True}


@router.post("/auth/token")
def auth_token(username: str = Form(""), password: str = Form(""),
               state: ServerState = Depends(server_state)) -> dict:
    """A MONAI-style token: the API key itself, given as the password (never stored twice)."""
    keys = state.options.api_keys
    if not keys or not any(secrets.compare_digest(password.encode(), k.encode()) for k in keys):
        raise HTTPException(401, "wrong API key: log in with any user name and the server's --api-key as password")
    return {"access_token": password, "token_type": "bearer"}
