"""The request-body cap (``--max-upload-mb``), enforced while the bytes arrive.

A pure ASGI middleware in front of every route: a declared ``Content-Length`` over the cap
is refused (413) before a byte of the body is read, and a body that keeps coming past the
cap (chunked, or a lying header) is cut off at the first chunk that passes it, with the
same 413, instead of being spooled to disk first and measured after.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OVERHEAD = 1 << 16  # multipart boundaries and form fields around the files themselves


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (plus the multipart overhead) with 413."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app, self.limit = app, max_bytes + OVERHEAD
        self.message = f"the request is over the server's limit of {max_bytes >> 20} MB (--max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = [0]

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise HTTPException(status_code=413, detail=self.message)
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": self.message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
