"""``POST /infer/{model}``: a MONAI Label infer request run on a casam session.

The image comes from ``session_id`` (a ``PUT /session/`` upload), else from ``image`` (a
datastore id: a session is opened on it on demand and kept for the client), else from an
uploaded ``file`` (a one-request session). The reply is MONAI's: ``output=all`` (default) a
multipart of ``params`` JSON and the label image, ``image`` the file alone, ``json`` the
params alone. The params carry casam's route (task, scores, τ), the decoder's IoU and the
timings beside MONAI's ``label_names`` and ``latencies``.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response

from runtime.sessions import Session
from casam_label.monai_apply import Applied, apply_request
from casam_label.monai_info import MODEL, labels
from casam_label.monai_prompts import MonaiRequest
from casam_label.monai_result import encode_label, label_volume, multipart
from casam_label.monai_sessions import MonaiSession


def check_model(model: str) -> None:
    if model != MODEL:
        raise HTTPException(404, f"no model {model!r}: this server has {MODEL!r} (see /info/)")


def reply_params(label: str, applied: Applied, session: Session, extension: str) -> dict[str, Any]:
    """MONAI's result params (``label_names``, ``latencies``) and casam's (route, IoU, timings)."""
    timings: dict[str, float] = {}
    for step in applied.interactions:
        for stage, ms in step.timings_ms.items():
            timings[stage] = round(timings.get(stage, 0.0) + ms, 3)
    last = applied.interactions[-1] if applied.interactions else None
    total = timings.get("total", 0.0) / 1e3
    return {"label": label, "label_names": {label: 1}, "result_extension": extension,
            "slices": sorted(applied.slices), "interactions": len(applied.interactions),
            "route": None if session.route is None else session.route.to_dict(),
            "iou": None if last is None else last.iou, "timings_ms": timings,
            "latencies": {"pre": 0, "infer": round(total, 4), "invert": 0, "post": 0, "write": 0,
                          "total": round(total, 4), "transform": None},
            "warnings": sorted({w for s in applied.interactions for w in s.warnings})}


def run_infer(session: Session, meta: Optional[MonaiSession], request: MonaiRequest, output: Optional[str],
              default_label: Optional[str] = None) -> Response:
    """Apply the request, encode this label's volume, and answer in the shape ``output`` asks."""
    label = request.label or default_label or "segment"
    last_roi = None if meta is None else meta.last_roi.get(label)
    applied = apply_request(session, label, request, last_roi)
    if meta is not None and request.roi is not None:
        meta.last_roi[label] = request.roi
    data, ext = encode_label(session, label_volume(session, label), request.result_extension, request.result_dtype)
    params = reply_params(label, applied, session, ext)
    if output == "json":
        return JSONResponse(params)
    filename = f"{label}_{secrets.token_hex(4)}{ext}"  # the client saves it under this name: fresh each time
    if output == "image":
        return Response(data, media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{filename}"'})
    body, content_type = multipart(params, data, filename)
    return Response(body, media_type=content_type)


def first_label(state: Any) -> str:
    return labels(state)[0]
