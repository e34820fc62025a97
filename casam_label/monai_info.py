"""``GET /info/`` in MONAI Label's shape, so a viewer knows which tools to show.

3D Slicer's MONAI Label module sorts models by ``type`` (plugins/slicer/MONAILabel/
MONAILabel.py, ``updateGUIFromParameterNode``): "segmentation" gets only a Run button,
"deepgrow" and "deepedit" get the foreground/background click tools, "scribbles" the
brushes. casam's one model per export is "deepgrow": boxes and clicks are what SAM takes.
``dimension`` 3 makes Slicer send every click on every slice and take the whole returned
volume for the segment (2 would keep one slice only and drop propagated slices). The
model's ``config`` entries appear in Slicer's options table and come back in each request.
"""

from __future__ import annotations

from typing import Any

from casam_label.state import ServerState

MODEL = "casam"
DEFAULT_LABELS = ("segment",)


def labels(state: ServerState) -> list[str]:
    """The label names a viewer offers first (``extras["monai_labels"]``, else one generic)."""
    return list(state.extras.get("monai_labels", DEFAULT_LABELS))


def route_info(state: ServerState) -> dict[str, Any]:
    pipe = state.pipe
    names = list(pipe.task_names)
    return {"tasks": names, "thresholds": {n: float(t) for n, t in zip(names, pipe.thresholds)},
            "routing": "each image or volume takes the task whose score is under its threshold τ, else plain SAM"}


def app_info(state: ServerState, datastore_status: dict[str, Any]) -> dict[str, Any]:
    """MONAI Label's ``MONAILabelApp.info()`` fields, with casam's routing under ``casam``."""
    names = labels(state)
    model = {"type": "deepgrow", "dimension": 3, "labels": {n: i for i, n in enumerate(names, start=1)},
             "description": "casam: Segment Anything with continual alignment; a box (ROI) and "
                            "foreground/background clicks per slice, decoder-only after the first prompt",
             "config": {"propagate": False}}
    return {"name": "casam-label", "description": "casam interactive segmentation (MONAI Label API)",
            "version": "0.8.5", "labels": names, "models": {MODEL: model}, "trainers": {}, "strategies": {},
            "scoring": {}, "train_stats": {}, "datastore": datastore_status, "casam": route_info(state)}
