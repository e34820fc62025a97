"""Parity of the exported chain with the PyTorch CASAM model, on the same images and prompts.

The exported chain is run through the runtime's own ``Pipeline`` (the code deployments
use), fed the not-yet-written manifest, so what is verified is exactly what will ship.
Routes must be identical; masks (low-resolution logits > 0) must reach the IoU bar of the
precision. Every align graph is also checked with its task forced, so a task that no
verification image routes to is still compared. Where the export has a ``decoder_mask``
graph, every prompt set is decoded a second time as a correction, both ways, with the
first pass's exported logits as ``mask_input`` (the same input to both chains), and those
masks count towards the same bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from casam_export.parity import MASK_IOU_BARS, VerificationImages, mask_ious, prompts_for, verification_images
from models.casam import routes_to_names
from models.router import IDENTITY_INDEX
from runtime.pipeline import Pipeline
from casam_core.names import IDENTITY
from runtime.preprocess import preprocess
from runtime.prompts import Prompts
from casam_bundle import Bundle
from models.bundle_models import build_model



class _Comparison:
    """Running maxima and mask IoUs over every (image, prompt set, route) compared."""

    def __init__(self) -> None:
        self.emb_diff = self.emb_scale = self.score_diff = self.score_rel = self.iou_diff = 0.0
        self.ious: list[float] = []
        self.corrections = 0  # masks among ``ious`` decoded with a mask_input (decoder_mask)

    def decode(self, model: nn.Module, pipe: Pipeline, emb_t: torch.Tensor, emb_o: np.ndarray, frame: Any,
               route: str, prompts: Mapping[str, np.ndarray], with_points: bool = True) -> None:
        """Decode boxes (and point prompts) both ways and record mask IoUs and IoU-head diffs."""
        index = IDENTITY_INDEX if route == IDENTITY else model.task_names.index(route)
        aligned = model.align(emb_t, index)
        hw = frame.original_hw
        kinds = (Prompts.for_image(hw, boxes=prompts["boxes"]),
                 Prompts.for_image(hw, points=prompts["points"], labels=prompts["point_labels"]))
        for given in kinds[: 2 if with_points else 1]:
            low_o = self.compare(model, pipe, (aligned, emb_o), frame, route, given)
            if pipe.capabilities.mask_input:  # a correction: the first pass's logits as mask_input
                again = Prompts.for_image(hw, given.boxes, given.points, given.labels, mask_input=low_o)
                self.compare(model, pipe, (aligned, emb_o), frame, route, again)
                self.corrections += len(low_o)

    def compare(self, model: nn.Module, pipe: Pipeline, embeddings: tuple[torch.Tensor, np.ndarray], frame: Any,
                route: str, given: Prompts) -> np.ndarray:
        """One decode both ways (aligned torch embedding, raw exported one); the exported logits."""
        aligned, emb_o = embeddings
        _, low_o, iou_o = pipe.decode(emb_o, frame, given, route=route)
        with torch.no_grad():  # the same Prompts, moved to the frame by the same arithmetic
            low_t, iou_t = model.decode(aligned, given, frame.scale_xy)
        self.ious += mask_ious(low_t.numpy() > 0, np.asarray(low_o) > 0)
        self.iou_diff = max(self.iou_diff, float(np.abs(iou_t.numpy().reshape(-1) - np.asarray(iou_o).reshape(-1)).max()))
        return np.asarray(low_o, dtype=np.float32)


def verify_export(
    out: Path,
    manifest: Mapping[str, Any],
    bundle: Bundle,
    sam: nn.Module,
    checks: Optional[VerificationImages] = None,
    backend: str = "auto",
    quiet: bool = True,
) -> dict[str, Any]:
    """Compare the exported chain in ``out`` (described by ``manifest``) with PyTorch CASAM
    on ``checks`` (default: the synthetic images)."""
    checks = checks or verification_images(None, bundle.preprocessing)
    model = build_model(bundle, sam)
    # The export has just hashed every graph; hashing them again here would double its I/O.
    pipe = Pipeline.from_manifest(out, backend, manifest=manifest, verify=False)
    precision = str(manifest["precision"])
    cmp = _Comparison()
    per_image = [_compare_image(model, pipe, bundle, cmp, i, image)
                 for i, image in enumerate(tqdm(checks.images, desc="verify", unit="image", disable=quiet))]
    routes_t = [p["route_pytorch"] for p in per_image]
    routes_o = [p["route_exported"] for p in per_image]
    summary = _summary(cmp, pipe, checks, routes_t == routes_o, MASK_IOU_BARS[precision])
    failures = []
    if routes_t != routes_o:
        failures.append(f"routes differ (pytorch {routes_t}, exported {routes_o})")
    if summary["mask_iou_mean"] < MASK_IOU_BARS[precision]:
        failures.append(f"mean mask IoU {summary['mask_iou_mean']:.5f} < {MASK_IOU_BARS[precision]}")
    return {"precision": precision, "summary": summary, "passed": not failures, "failures": failures,
            "per_image": per_image}


def _compare_image(model: nn.Module, pipe: Pipeline, bundle: Bundle, cmp: _Comparison, i: int,
                   image: np.ndarray) -> dict[str, Any]:
    """One verification image both ways: embeddings, scores, route, and its prompts' masks
    (on image 0 every align graph and plain SAM as well, whatever the routes)."""
    x, _ = preprocess(image, bundle.preprocessing)
    with torch.no_grad():
        emb_t = model.encode(torch.from_numpy(x))
        _, scores_t, route_idx = model.route(emb_t)
    emb_o, frame_o = pipe.embed(image)
    route_o, scores_o, _ = pipe.route(emb_o)
    route_t = routes_to_names(route_idx, model.task_names)[0]
    emb_np = emb_t.numpy()
    cmp.emb_diff = max(cmp.emb_diff, float(np.abs(emb_np - np.asarray(emb_o)).max()))
    cmp.emb_scale = max(cmp.emb_scale, float(np.abs(emb_np).max()))
    s_t = scores_t.numpy()[0]
    diff = np.abs(s_t - scores_o)
    cmp.score_diff = max(cmp.score_diff, float(diff.max()))
    cmp.score_rel = max(cmp.score_rel, float((diff / np.maximum(np.abs(s_t), 1e-6)).max()))
    prompts = prompts_for(image, seed=i)
    first = len(cmp.ious)
    cmp.decode(model, pipe, emb_t, emb_o, frame_o, route_o, prompts)
    if i == 0:
        for forced in [*model.task_names, IDENTITY]:
            if forced != route_o:
                cmp.decode(model, pipe, emb_t, emb_o, frame_o, forced, prompts, with_points=False)
    return {"image": i, "size": list(image.shape[:2]), "route_pytorch": route_t, "route_exported": route_o,
            "scores_pytorch": s_t.tolist(), "scores_exported": np.asarray(scores_o).tolist(),
            "mask_iou_min": min(cmp.ious[first:])}


def _summary(cmp: _Comparison, pipe: Pipeline, checks: VerificationImages, routes_identical: bool,
             bar: float) -> dict[str, Any]:
    """parity.json's summary of the comparison."""
    ious = np.array(cmp.ious)
    return {
        "reference": "pytorch fp32 (models.CASAM)",
        "backend": pipe.backend.name,
        "images": len(checks.images),
        "image_source": checks.source,
        "masks_compared": int(ious.size),
        "mask_input_masks_compared": cmp.corrections,
        "embeddings_max_abs_diff": cmp.emb_diff,
        "embeddings_max_abs": cmp.emb_scale,
        "scores_max_abs_diff": cmp.score_diff,
        "scores_max_rel_diff": cmp.score_rel,
        "iou_predictions_max_abs_diff": cmp.iou_diff,
        "routes_identical": routes_identical,
        "mask_iou_mean": float(ious.mean()),
        "mask_iou_min": float(ious.min()),
        "bars": {"routes_identical": True, "mask_iou_mean": bar},
    }
