"""Scoring a deployment on labelled cases: IoU and BIoU per image, per route and overall, and
the routing accuracy against an expected task, with the trainer's metric definitions
(casam_core.metrics).

This is how a site checks an exported, fp16 or quantised deployment on its own cases before
going live: the same numbers the trainer reported, computed on what the edge produced.
A volume's structure is scored slice by slice with the 2-D definitions, averaged over the
slices where the structure or its prediction appears.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np

from casam_core.metrics import band_width, boundary_iou, image_scores, iou


class DeploymentScores:
    """Collects one record per image or volume; ``summary`` aggregates them."""

    def __init__(self, expect_task: Optional[str] = None) -> None:
        self.expect_task = expect_task
        self.records: list[dict[str, Any]] = []

    def _add(self, name: str, route: str, scores: Optional[tuple[float, float]], correct: Optional[float]) -> dict[str, Any]:
        record: dict[str, Any] = {"image": name, "route": route}
        if scores is not None:
            record["iou"], record["biou"] = scores
        if correct is not None:
            record["route_correct"] = correct
        self.records.append(record)
        return record

    def add_image(self, name: str, route: str, masks: Optional[np.ndarray], truth: Optional[np.ndarray],
                  truth_values: Sequence[int]) -> dict[str, Any]:
        """K predicted masks (prompt order) against the structures ``truth == truth_values[k]``."""
        scores = None
        if masks is not None and truth is not None and len(masks) == len(truth_values) > 0:
            scores = image_scores(np.asarray(masks), np.stack([truth == v for v in truth_values]))
        correct = None if self.expect_task is None else float(route == self.expect_task)
        return self._add(name, route, scores, correct)

    def add_volume(self, name: str, route: str, slice_routes: Sequence[str], labels: np.ndarray,
                   truth: Optional[np.ndarray], truth_values: Sequence[int], axis: int) -> dict[str, Any]:
        """Predicted labels 1..K against ``truth == truth_values[k-1]``, slice by slice."""
        scores = None
        if truth is not None and truth_values:
            if truth.shape != labels.shape:
                raise ValueError(f"label volume {truth.shape} does not match the prediction {labels.shape}")
            per_structure = [_volume_structure(np.moveaxis(labels == k, axis, 0), np.moveaxis(truth == v, axis, 0))
                             for k, v in enumerate(truth_values, start=1)]
            scores = (float(np.mean([s[0] for s in per_structure])), float(np.mean([s[1] for s in per_structure])))
        correct = None
        if self.expect_task is not None and slice_routes:
            correct = float(np.mean([r == self.expect_task for r in slice_routes]))
        return self._add(name, route, scores, correct)

    def summary(self) -> dict[str, Any]:
        scored = [r for r in self.records if "iou" in r]
        by_route: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in scored:
            by_route[r["route"]].append(r)
        out: dict[str, Any] = {
            "images": self.records,
            "overall": _mean(scored),
            "per_route": {route: _mean(rs) for route, rs in sorted(by_route.items())},
        }
        if self.expect_task is not None:
            judged = [r["route_correct"] for r in self.records if "route_correct" in r]
            out["expect_task"] = self.expect_task
            out["routing_accuracy"] = float(np.mean(judged)) if judged else None
        return out

    def line(self) -> str:
        s = self.summary()
        parts = []
        if s["overall"]["n"]:
            parts.append(f"IoU {s['overall']['iou']:.4f}, BIoU {s['overall']['biou']:.4f} over {s['overall']['n']}")
            parts += [f"{route}: IoU {v['iou']:.4f} BIoU {v['biou']:.4f} (n={v['n']})" for route, v in s["per_route"].items()]
        if s.get("routing_accuracy") is not None:
            parts.append(f"routing accuracy {s['routing_accuracy']:.3f} (expected {self.expect_task})")
        return "evaluation: " + ("; ".join(parts) or "nothing to score")


def _mean(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"n": 0, "iou": None, "biou": None}
    return {"n": len(records), "iou": float(np.mean([r["iou"] for r in records])),
            "biou": float(np.mean([r["biou"] for r in records]))}


def _volume_structure(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean IoU, mean BIoU) over the slices where either mask appears."""
    on = np.flatnonzero(pred.any(axis=(1, 2)) | truth.any(axis=(1, 2)))
    if on.size == 0:
        return 0.0, 0.0
    side = band_width(*truth.shape[1:])
    return (float(np.mean([iou(pred[k], truth[k]) for k in on])),
            float(np.mean([boundary_iou(pred[k], truth[k], side) for k in on])))
