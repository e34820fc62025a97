"""Session objects → the JSON replies of docs/INTERACTIVE.md (one place, so the native API,
its schemas and the viewer agree)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from casam_label.mask_wire import encode
from runtime.sessions import Interaction, Session


def spacing(session: Session) -> Optional[list[float]]:
    """Voxel size in mm along each array axis (from the affine), or None for a picture."""
    affine = session.source.scan.affine
    if affine is None:
        return None
    sizes = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return [round(float(s), 6) for s in sizes[: len(session.source.shape)]]


def describe(session: Session) -> dict[str, Any]:
    """The session description: ``Session.describe`` plus the geometry a viewer draws with."""
    out = session.describe()
    out["spacing"] = spacing(session)
    out["slice_shape"] = list(session.source.slice_hw)
    out["kind"] = "volume" if session.source.is_volume else "image"
    return out


def mask_entry(k: int, mask: Optional[np.ndarray], hw: tuple[int, int], fmt: str) -> dict[str, Any]:
    """One slice's mask on the wire (an empty one when ``mask`` is None)."""
    wire = encode(np.zeros(hw, dtype=bool) if mask is None else mask, fmt)
    return {"slice": int(k), **wire}


def interaction(result: Interaction, hw: tuple[int, int], fmt: str, server_ms: float) -> dict[str, Any]:
    """An ``Interaction`` as the interaction reply."""
    timings = {k: round(float(v), 3) for k, v in result.timings_ms.items()}
    timings["server"] = round(server_ms, 3)
    return {
        "label": result.label,
        "slice": int(result.slice),
        "iou": None if result.iou is None else float(result.iou),
        "undo_depth": int(result.undo_depth),
        "route": result.route.to_dict(),
        "timings_ms": timings,
        "masks": [mask_entry(k, m, hw, fmt) for k, m in sorted(result.masks.items())],
        "warnings": list(result.warnings),
    }


def cleared(session: Session, label: Optional[str], slices: dict[str, list[int]], server_ms: float) -> dict[str, Any]:
    """The reply to a reset: every slice it emptied, as an empty mask, per label."""
    hw = session.source.slice_hw
    return {
        "label": label,
        "slice": None,
        "iou": None,
        "undo_depth": 0,
        "route": None if session.route is None else session.route.to_dict(),
        "timings_ms": {"total": 0.0, "server": round(server_ms, 3)},
        "masks": [dict(mask_entry(k, None, hw, "rle"), label=name) for name, ks in sorted(slices.items())
                  for k in ks],
        "warnings": [],
    }
