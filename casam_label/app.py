"""The casam-label ASGI app: routers on one ``ServerState``, and one error shape for all.

Every error reaches the client as ``{"error": "<one line>"}`` with a 4xx status for what
the client sent (a casam ``InputError``, a session error, a validation failure) and 500
for a fault of the server, whose detail goes to the server's log, never to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from casam_core.cli_frame import one_line
from casam_core.errors import CasamError, InputError, SessionError
from casam_label import native
from casam_label.body_limit import BodyLimit
from casam_label.state import ServerOptions, ServerState

log = logging.getLogger("casam_label")
__all__ = ["ServerOptions", "ServerState", "create_app", "error"]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SessionError)
    async def _session(_: Request, exc: SessionError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(InputError)
    async def _input(_: Request, exc: InputError) -> JSONResponse:
        return error(getattr(exc, "status", 400), str(exc))  # 413 too large, 404 unknown id, 409 exists

    @app.exception_handler(CasamError)
    async def _casam(_: Request, exc: CasamError) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error(500, f"internal error ({type(exc).__name__}); see the server log")


def create_app(state: ServerState) -> FastAPI:
    """The app on ``state``: health probes here, the APIs from their routers."""
    app = FastAPI(title="casam-label", docs_url=None, redoc_url=None)
    app.state.casam = state
    _install_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        if not state.ready:
            return error(503, "engines are still loading")
        return JSONResponse({"ready": True, "tasks": list(state.pipe.task_names)})

    # The APIs, one router each (the MONAI Label API and the viewer add their one-line includes here).
    app.include_router(native.router)
    app.add_middleware(BodyLimit, max_bytes=state.options.max_upload_mb << 20)
    return app
