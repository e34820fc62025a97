"""Evaluating a CA-SAM model on datasets: IoU/BIoU with box prompts, routing, OOD rejection.

The test prompt is one exact box per structure (METHOD.md). Low-resolution logits go
through ``runtime.postprocess.masks_from_logits`` to the original size, so these numbers
are what the deployed runtime reproduces, not a PyTorch-only approximation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from models.casam import CASAM, TaskChoice, routes_to_names
from models.router import IDENTITY_INDEX
from runtime.postprocess import masks_from_logits
from runtime.preprocess import Preprocessing, frame_for
from runtime.prompts import Prompts
from trainer.data import Sample
from casam_core.metrics import image_scores
from trainer.prompt_sampling import tight_boxes


@dataclass
class SetResult:
    """Scores of one dataset under one model."""

    name: str
    count: int
    iou: float
    biou: float
    routes: list[str]
    routing_accuracy: Optional[float] = None
    per_image: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "iou": self.iou, "biou": self.biou,
                "routing_accuracy": self.routing_accuracy,
                "routes": {r: self.routes.count(r) for r in sorted(set(self.routes))}, "per_image": self.per_image}


@torch.no_grad()
def route_embeddings(model: CASAM, embeddings: torch.Tensor, task: TaskChoice = None, chunk: int = 16) -> tuple[list[int], np.ndarray]:
    """(route index per image, B×N scores) for raw embeddings, routed or forced."""
    device = model.thresholds.device
    routes: list[int] = []
    scores: list[np.ndarray] = []
    for start in range(0, embeddings.shape[0], chunk):
        _, s, r = model.route(embeddings[start : start + chunk].to(device).float(), task)
        routes += [int(x) for x in r]
        scores.append(s.cpu().numpy())
    return routes, np.concatenate(scores) if scores else np.zeros((0, model.router.num_tasks))


@torch.no_grad()
def predict_masks(model: CASAM, embedding: torch.Tensor, route: int, boxes: np.ndarray,
                  original_hw: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """K boxes (original pixels) on one raw embedding → K×H×W bool masks at the original size."""
    device = model.thresholds.device
    frame = frame_for(original_hw[0], original_hw[1], prep)
    aligned = model.align(embedding.to(device).float().reshape(1, *embedding.shape[-3:]), route)
    low_res, _ = model.decode(aligned, Prompts.for_image(original_hw, boxes=boxes), frame.scale_xy)
    return masks_from_logits(low_res.float().cpu().numpy(), frame)


@dataclass
class EvalPass:
    """Which path one evaluation pass takes.

    ``task`` None routes each image; a name or "identity" forces one path. With
    ``expected`` the routing accuracy towards that task is reported as well. Several
    passes over the same samples and model may share ``memo`` ((image, route) → scores),
    so a routed pass only decodes the images whose route no earlier pass took.
    """

    task: TaskChoice = None
    expected: Optional[str] = None
    memo: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)


def evaluate_set(model: CASAM, embeddings: torch.Tensor, samples: Sequence[Sample], prep: Preprocessing,
                 name: str, how: EvalPass = EvalPass(), quiet: bool = True) -> SetResult:
    """Mean IoU/BIoU (per image over its masks, then over images) of ``samples``."""
    routes, _ = route_embeddings(model, embeddings, how.task)
    names = routes_to_names(routes, model.task_names)
    memo, expected = how.memo, how.expected
    per_image: list[dict[str, Any]] = []
    for i, sample in enumerate(tqdm(samples, desc=f"eval {name}", unit="img", disable=quiet, leave=False)):
        if (i, routes[i]) not in memo:
            gts = sample.structures()
            preds = predict_masks(model, embeddings[i], routes[i], tight_boxes(gts), sample.original_hw, prep)
            memo[(i, routes[i])] = image_scores(preds, gts)
        s_iou, s_biou = memo[(i, routes[i])]
        per_image.append({"stem": sample.stem, "route": names[i], "iou": s_iou, "biou": s_biou})
    accuracy = None if expected is None else float(np.mean([r == expected for r in names])) if names else None
    return SetResult(name, len(samples), float(np.mean([p["iou"] for p in per_image])) if per_image else float("nan"),
                     float(np.mean([p["biou"] for p in per_image])) if per_image else float("nan"),
                     names, accuracy, per_image)


def rejection_rate(model: CASAM, embeddings: torch.Tensor) -> tuple[float, list[str]]:
    """Fraction of images routed to the identity (plain SAM), and every image's route."""
    routes, _ = route_embeddings(model, embeddings)
    names = routes_to_names(routes, model.task_names)
    return (float(np.mean([r == IDENTITY_INDEX for r in routes])) if routes else float("nan")), names


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain aligned text table (numbers as percentages where they are fractions)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{100 * v:.2f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])
