"""The native JSON API of casam-label (docs/INTERACTIVE.md; schemas in casam_label/schemas/).

Every route needs the client's identity (``client_identity``: the API key when the server
has keys), and a session is found only with its owner's identity. Engine work runs in
FastAPI's threadpool (sync endpoints, or ``run_in_threadpool``) and is serialised per
session by the session's lock, so one client's slow propagation never blocks another's click.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any, BinaryIO, Iterator, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from casam_core import __version__
from casam_core.cli_frame import one_line
from casam_core.errors import CasamError, InputError, SessionLimitError
from casam_io.readers import ReadOptions
from casam_label import replies
from casam_label.auth import client_identity
from casam_label.results import download
from casam_label.state import ServerState, ready_state
from casam_label.uploads import UploadLimits, scan_from_files
from casam_label.views import labels_png, slice_png
from runtime.sessions import Session, SessionOptions, SessionSource

router = APIRouter(prefix="/api", dependencies=[Depends(client_identity)])

#: Intensity windows a viewer offers as presets (center, width in the scan's units: HU for CT).
WINDOW_PRESETS = {"ct-soft-tissue": [40, 400], "ct-lung": [-600, 1500], "ct-bone": [400, 1800],
                  "ct-brain": [40, 80], "ct-liver": [60, 160]}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenRequest(_Strict):
    datastore_id: str
    axis: int = Field(default=2, ge=0, le=2)
    task: Optional[str] = None


class InteractRequest(_Strict):
    action: Literal["box", "click", "undo", "reset"]
    label: Optional[str] = None
    slice: Optional[int] = None
    box: Optional[list[float]] = Field(default=None, min_length=4, max_length=4)
    point: Optional[list[float]] = Field(default=None, min_length=2, max_length=2)
    positive: bool = True
    mask_format: Literal["rle", "png"] = "rle"


class PropagateRequest(_Strict):
    label: str
    slice: Optional[int] = None
    mask_format: Literal["rle", "png"] = "rle"


def _session(state: ServerState, session_id: str, owner: str) -> Session:
    return state.store.get(session_id, owner)


def _create(state: ServerState, owner: str, scan_and_cleanup: tuple, axis: int, task: Optional[str]) -> dict:
    """A session on an opened scan; the scan's cleanup runs if anything refuses it."""
    scan, cleanup = scan_and_cleanup
    try:
        source = SessionSource.open(scan, state.pipe.preprocessing, axis)
        source.cleanup = cleanup
        options = SessionOptions(task=task or state.options.default_task, prefetch=state.options.prefetch)
        return replies.describe(state.store.create(source, owner, options))
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise


def _room(state: ServerState) -> None:
    """Refuse over --max-sessions before reading an upload (the store checks again, atomically)."""
    state.store.expire()
    if len(state.store) >= state.store.options.max_sessions:
        raise SessionLimitError(f"the server holds its limit of {state.store.options.max_sessions} sessions; "
                                "close one (DELETE) or wait for idle ones to expire")


def _form_axis(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value.strip() not in ("0", "1", "2"):
        raise InputError(f"axis must be 0, 1 or 2, got {value!r}")
    return int(value)


def _open_upload(state: ServerState, owner: str, files: list[tuple[str, BinaryIO]], axis: int,
                 task: Optional[str]) -> dict:
    _room(state)
    opts = state.options
    limits = UploadLimits(opts.max_upload_mb << 20, opts.max_files)
    return _create(state, owner, scan_from_files(files, limits, opts.work_dir, ReadOptions()), axis, task)


def _open_datastore(state: ServerState, owner: str, request: OpenRequest) -> dict:
    if state.datastore is None:
        raise InputError("this server has no datastore (start it with --datastore DIR); upload the image instead")
    _room(state)
    return _create(state, owner, (state.datastore.open(request.datastore_id), None), request.axis, request.task)


def _model(cls: type[BaseModel], data: Any) -> Any:
    """``data`` validated as ``cls``, or one InputError line naming the first problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InputError(f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request") from None


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the request body is not valid JSON ({exc})") from None


@router.post("/sessions", status_code=201)
async def open_session(request: Request, state: ServerState = Depends(ready_state),
                       owner: str = Depends(client_identity)) -> JSONResponse:
    """Open a session from an upload (multipart ``file``) or a datastore id (JSON)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=state.options.max_files, max_fields=16) as form:
            parts = form.getlist("file")
            if any(not isinstance(p, UploadFile) for p in parts):
                raise InputError("multipart field 'file' must hold files, not text")
            files = [(p.filename or "", p.file) for p in parts]
            axis = _form_axis(form.get("axis"), state.options.default_axis)
            task = form.get("task") or None
            if task is not None and not isinstance(task, str):
                raise InputError("form field 'task' must be text")
            described = await run_in_threadpool(_open_upload, state, owner, files, axis, task)
    else:
        body = _model(OpenRequest, await _json_body(request))
        described = await run_in_threadpool(_open_datastore, state, owner, body)
    return JSONResponse(described, status_code=201)


@router.get("/info")
def info(state: ServerState = Depends(ready_state)) -> dict:
    pipe, opts, store = state.pipe, state.options, state.store.options
    return {"name": "casam-label", "version": __version__,
            "tasks": [{"name": n, "threshold": float(t)} for n, t in zip(pipe.task_names, pipe.thresholds)],
            "preprocessing": pipe.preprocessing.to_dict(),
            "capabilities": {"mask_input": bool(pipe.capabilities.mask_input)},
            "window_presets": WINDOW_PRESETS, "datastore": state.datastore is not None,
            "limits": {"max_upload_mb": opts.max_upload_mb, "max_files": opts.max_files,
                       "max_sessions": store.max_sessions, "cache_mb": store.cache_mb,
                       "idle_timeout_s": store.idle_timeout_s}}


@router.get("/datastore")
def datastore(state: ServerState = Depends(ready_state)) -> dict:
    items = [] if state.datastore is None else [i.to_dict() for i in state.datastore.images()]
    return {"datastore": state.datastore is not None, "images": items}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, state: ServerState = Depends(ready_state),
                owner: str = Depends(client_identity)) -> dict:
    return replies.describe(_session(state, session_id, owner))


@router.delete("/sessions/{session_id}", status_code=204)
def delete_session(session_id: str, state: ServerState = Depends(ready_state),
                   owner: str = Depends(client_identity)) -> Response:
    state.store.close(session_id, owner)
    return Response(status_code=204)


@router.get("/sessions/{session_id}/view")
def view(session_id: str, axis: Optional[int] = Query(None), slice: Optional[int] = Query(None),
         center: Optional[float] = Query(None), width: Optional[float] = Query(None),
         state: ServerState = Depends(ready_state), owner: str = Depends(client_identity)) -> Response:
    session = _session(state, session_id, owner)
    return Response(slice_png(session, axis, slice, center, width), media_type="image/png")


@router.get("/sessions/{session_id}/labels/view")
def labels_view(session_id: str, axis: Optional[int] = Query(None), slice: Optional[int] = Query(None),
                state: ServerState = Depends(ready_state), owner: str = Depends(client_identity)) -> Response:
    return Response(labels_png(_session(state, session_id, owner), axis, slice), media_type="image/png")


def _act(session: Session, body: InteractRequest) -> Any:
    """Run one interaction on the session (its methods take the session's lock)."""
    if body.action == "reset":
        slices = {n: s["slices"] for n, s in session.describe()["labels"].items() if body.label in (None, n)}
        session.reset(body.label)
        return slices
    if body.label is None:
        raise InputError(f"action {body.action!r} needs a label")
    if body.action == "box":
        if body.box is None:
            raise InputError("action 'box' needs box: [x0, y0, x1, y1]")
        return session.box(body.label, body.box, body.slice)
    if body.action == "click":
        if body.point is None:
            raise InputError("action 'click' needs point: [x, y]")
        return session.click(body.label, body.point[0], body.point[1], body.positive, body.slice)
    return session.undo(body.label, body.slice)


@router.post("/sessions/{session_id}/interact")
def interact(session_id: str, body: dict, state: ServerState = Depends(ready_state),
             owner: str = Depends(client_identity)) -> dict:
    """A box, a click, an undo or a reset; replies with the changed masks and the route."""
    t0 = time.perf_counter()
    request = _model(InteractRequest, body)
    session = _session(state, session_id, owner)
    result = _act(session, request)
    ms = (time.perf_counter() - t0) * 1e3
    if request.action == "reset":
        return replies.cleared(session, request.label, result, ms)
    return replies.interaction(result, session.source.slice_hw, request.mask_format, ms)


def _ndjson(session: Session, body: PropagateRequest, t0: float) -> Iterator[bytes]:
    """Propagate in a worker thread, yielding its progress as NDJSON lines. The first line is
    awaited before the response starts, so a refusal is still a 4xx with one error line."""
    lines: "queue.Queue[tuple[str, Any]]" = queue.Queue()
    done = [0]

    def progress(j: int) -> None:
        done[0] += 1
        lines.put(("progress", {"slice": int(j), "done": done[0]}))

    def work() -> None:
        try:
            result = session.propagate(body.label, body.slice, progress)
            ms = (time.perf_counter() - t0) * 1e3
            lines.put(("result", replies.interaction(result, session.source.slice_hw, body.mask_format, ms)))
        except CasamError as exc:
            lines.put(("error", exc))
        except Exception as exc:  # noqa: BLE001 - a server fault becomes one line, never a traceback
            lines.put(("error", RuntimeError(f"internal error ({type(exc).__name__}); see the server log")))

    threading.Thread(target=work, name="casam-propagate", daemon=True).start()
    first = lines.get()
    if first[0] == "error":
        raise first[1]

    def stream() -> Iterator[bytes]:
        item = first
        while True:
            kind, value = item
            yield (json.dumps({kind: one_line(value) if kind == "error" else value}) + "\n").encode()
            if kind != "progress":
                return
            item = lines.get()

    return stream()


@router.post("/sessions/{session_id}/propagate")
def propagate(session_id: str, body: dict, request: Request, state: ServerState = Depends(ready_state),
              owner: str = Depends(client_identity)) -> Any:
    """From a label's mask on a slice outward (casam-infer's rule); NDJSON progress on request."""
    t0 = time.perf_counter()
    parsed = _model(PropagateRequest, body)
    session = _session(state, session_id, owner)
    if "application/x-ndjson" in request.headers.get("accept", ""):
        return StreamingResponse(_ndjson(session, parsed, t0), media_type="application/x-ndjson")
    result = session.propagate(parsed.label, parsed.slice)
    ms = (time.perf_counter() - t0) * 1e3
    return replies.interaction(result, session.source.slice_hw, parsed.mask_format, ms)


@router.get("/sessions/{session_id}/result")
def result(session_id: str, format: str = Query("nifti"), label: Optional[str] = Query(None),
           state: ServerState = Depends(ready_state), owner: str = Depends(client_identity)) -> Response:
    """The labels as NIfTI, DICOM SEG or PNG, from casam-infer's writers."""
    session = _session(state, session_id, owner)
    with session.lock:
        out = download(session, format, label, state.options.work_dir)
    return Response(out.data, media_type=out.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{out.filename}"'})
