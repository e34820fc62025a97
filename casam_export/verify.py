"""Parity of the exported chain with the PyTorch CASAM model, on the same images and prompts.

The exported chain is run through the runtime's own ``Pipeline`` (the code deployments
use), fed the not-yet-written manifest, so what is verified is exactly what will ship.
Routes must be identical; masks (low-resolution logits > 0) must reach the IoU bar of the
precision. Every align graph is also checked with its task forced, so a task that no
verification image routes to is still compared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from casam_export.errors import ExportError
from casam_export.quantize import INT8_MASK_IOU_BAR
from runtime.deployment import UNKNOWN, mask_ious  # noqa: F401  (mask_ious: one implementation, re-exported)
from models.casam import routes_to_names
from models.router import IDENTITY_INDEX
from casam_core.errors import InputError
from casam_io.image_io import image_files, read_prepared
from casam_io.intensity import Intensity
from runtime.pipeline import Pipeline
from casam_core.names import IDENTITY
from runtime.preprocess import preprocess
from casam_bundle import Bundle
from models.bundle_models import build_model

PathLike = Union[str, os.PathLike]
MASK_IOU_BARS = {"fp32": 0.999, "fp16": 0.99, "int8": INT8_MASK_IOU_BAR}
MAX_VERIFY_IMAGES = 8


def synthetic_images(seed: int = 0) -> list[np.ndarray]:
    """Three seeded images of different sizes, aspect ratios and depths (RGB, grey, 16-bit).

    Blobs on a textured background give the encoder structure to respond to; the odd sizes
    exercise the longest-side resize and padding. They are pictures, which every intensity
    handling min-max scales (``casam_io.intensity.effective_mode``), as preprocessing does
    with the 16-bit one, so they need no recorded window.
    """
    rng = np.random.default_rng(seed)
    images = []
    for h, w, kind in ((300, 420, "rgb"), (256, 256, "grey"), (410, 230, "uint16")):
        yy, xx = np.mgrid[0:h, 0:w]
        canvas = 40 + 20 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 6, (h, w))
        for _ in range(3):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.08, 0.2) * w
            canvas[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] += rng.uniform(90, 160)
        if kind == "rgb":
            tint = rng.uniform(0.6, 1.0, 3)
            images.append(np.clip(canvas[..., None] * tint, 0, 255).astype(np.uint8))
        elif kind == "grey":
            images.append(np.clip(canvas, 0, 255).astype(np.uint8))
        else:
            images.append(np.clip(canvas * 200, 0, 65535).astype(np.uint16))
    return images


def image_paths(folder: PathLike, option: str) -> list[Path]:
    """The image files of ``folder`` (or ``folder/images``) in name order: pictures, DICOM and
    NIfTI files, listed as ``casam-train eval --ood`` lists an image set; an empty or missing
    folder is one ExportError naming ``option``."""
    try:
        return list(image_files(folder).values())
    except InputError as exc:
        raise ExportError(f"{option}: {exc}") from exc


@dataclass(frozen=True)
class VerificationImages:
    """The images an export is checked on, prepared as the deployment prepares them, and
    where they came from (the folder, or "synthetic"). Read once per export: the int8
    bars, the chain's parity and the stored verification set use the same images.
    ``labels`` names each image's origin: the task whose held-out image it is, ``UNKNOWN``
    for a --verify-images site image, or "synthetic"."""

    images: tuple[np.ndarray, ...]
    source: str
    labels: tuple[str, ...] = ()

    def labels_or_default(self) -> tuple[str, ...]:
        return self.labels or (("synthetic" if self.source == "synthetic" else UNKNOWN),) * len(self.images)


def verification_images(folder: Optional[PathLike], intensity: Intensity, bundle: Optional[Bundle] = None,
                        count: int = MAX_VERIFY_IMAGES) -> VerificationImages:
    """The tasks' held-out images (with ``bundle``: up to ``count``, spread over the tasks'
    split.json "test" lists), then the first MAX_VERIFY_IMAGES of ``folder`` (site images);
    ``synthetic_images`` when there are neither.

    ``intensity`` is the bundle's recorded handling and has no default: the deployment
    prepares every file with it (``read_prepared``: a volume is its middle slice, windowed
    over the whole volume), so parity measured on other grey levels would verify a chain
    the deployment never runs. An empty folder or an unreadable image is an ExportError.
    """
    held_out = held_out_images(bundle, intensity, count) if bundle is not None else []
    site: list[np.ndarray] = []
    if folder is not None:
        files = image_paths(folder, "--verify-images")[:MAX_VERIFY_IMAGES]
        try:
            site = [read_prepared(p, intensity)[0] for p in files]
        except InputError as exc:
            raise ExportError(f"--verify-images: {exc}") from exc
    if not held_out and not site:
        return VerificationImages(tuple(synthetic_images()), "synthetic")
    labels = tuple(label for label, _ in held_out) + (UNKNOWN,) * len(site)
    parts = ([f"held-out images of {', '.join(dict.fromkeys(label for label, _ in held_out))}"] if held_out else []) \
        + ([str(Path(folder))] if site else [])
    return VerificationImages(tuple(img for _, img in held_out) + tuple(site), " + ".join(parts), labels)


def held_out_images(bundle: Bundle, intensity: Intensity, count: int) -> list[tuple[str, np.ndarray]]:
    """(task, image): up to ``count`` held-out images taken in turn from each task's split
    (the images the calibration never saw), or none where the recorded datasets are gone."""
    from casam_export.quantize import _split_images

    per_task = {name: _split_images(bundle, name, count, intensity, part="test") for name in bundle.task_names}
    chosen: list[tuple[str, np.ndarray]] = []
    for turn in range(count):
        for name, images in per_task.items():
            if turn < len(images) and len(chosen) < count:
                chosen.append((name, images[turn]))
    return chosen


def prompts_for(image: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Three boxes and two two-point prompts (one positive, one negative) in original pixels."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, 0.5, 3) * w, rng.uniform(0, 0.5, 3) * h
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.2, 0.5, 3) * w, y0 + rng.uniform(0.2, 0.5, 3) * h], axis=1)
    points = rng.uniform(0.1, 0.9, (2, 2, 2)) * np.array([w, h])
    return {"boxes": boxes.astype(np.float32), "points": points.astype(np.float32),
            "point_labels": np.array([[1, 0], [1, 1]], np.float32)}


class _Comparison:
    """Running maxima and mask IoUs over every (image, prompt set, route) compared."""

    def __init__(self) -> None:
        self.emb_diff = self.emb_scale = self.score_diff = self.score_rel = self.iou_diff = 0.0
        self.ious: list[float] = []

    def decode(self, model: nn.Module, pipe: Pipeline, emb_t: torch.Tensor, emb_o: np.ndarray, frame: Any,
               route: str, prompts: Mapping[str, np.ndarray], with_points: bool = True) -> None:
        """Decode boxes (and point prompts) both ways and record mask IoUs and IoU-head diffs."""
        index = IDENTITY_INDEX if route == IDENTITY else model.task_names.index(route)
        aligned = model.align(emb_t, index)
        for use in (("boxes",), ("points", "point_labels"))[: 2 if with_points else 1]:
            kw = {k: prompts[k] for k in use}
            _, low_o, iou_o = pipe.decode(emb_o, frame, route=route, **kw)
            coords, labels, _ = Pipeline.prompts(frame, **kw)  # the runtime's own prompt encoding
            with torch.no_grad():
                low_t, iou_t = model.decoder(aligned, torch.from_numpy(coords), torch.from_numpy(labels))
            self.ious += mask_ious(low_t.numpy() > 0, np.asarray(low_o) > 0)
            self.iou_diff = max(self.iou_diff, float(np.abs(iou_t.numpy().reshape(-1) - np.asarray(iou_o).reshape(-1)).max()))


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
    checks = checks or verification_images(None, bundle.preprocessing.intensity)
    images, source = checks.images, checks.source
    model = build_model(bundle, sam)
    # The export has just hashed every graph; hashing them again here would double its I/O.
    pipe = Pipeline.from_manifest(out, backend, manifest=manifest, verify=False)
    precision = str(manifest["precision"])
    bar = MASK_IOU_BARS[precision]
    cmp = _Comparison()
    routes_t, routes_o, per_image = [], [], []
    for i, image in enumerate(tqdm(images, desc="verify", unit="image", disable=quiet)):
        x, _ = preprocess(image, bundle.preprocessing)
        with torch.no_grad():
            emb_t = model.encode(torch.from_numpy(x))
            _, scores_t, route_idx = model.route(emb_t)
        emb_o, frame_o = pipe.embed(image)
        route_o, scores_o, _ = pipe.route(emb_o)
        route_t = routes_to_names(route_idx, model.task_names)[0]
        routes_t.append(route_t)
        routes_o.append(route_o)
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
        if i == 0:  # every align graph (and plain SAM) at least once, whatever the routes
            for forced in [*model.task_names, IDENTITY]:
                if forced != route_o:
                    cmp.decode(model, pipe, emb_t, emb_o, frame_o, forced, prompts, with_points=False)
        per_image.append({"image": i, "size": list(image.shape[:2]), "route_pytorch": route_t, "route_exported": route_o,
                          "scores_pytorch": s_t.tolist(), "scores_exported": np.asarray(scores_o).tolist(),
                          "mask_iou_min": min(cmp.ious[first:])})
    ious = np.array(cmp.ious)
    summary = {
        "reference": "pytorch fp32 (models.CASAM)",
        "backend": pipe.backend.name,
        "images": len(images),
        "image_source": source,
        "masks_compared": int(ious.size),
        "embeddings_max_abs_diff": cmp.emb_diff,
        "embeddings_max_abs": cmp.emb_scale,
        "scores_max_abs_diff": cmp.score_diff,
        "scores_max_rel_diff": cmp.score_rel,
        "iou_predictions_max_abs_diff": cmp.iou_diff,
        "routes_identical": routes_t == routes_o,
        "mask_iou_mean": float(ious.mean()),
        "mask_iou_min": float(ious.min()),
        "bars": {"routes_identical": True, "mask_iou_mean": bar},
    }
    failures = []
    if routes_t != routes_o:
        failures.append(f"routes differ (pytorch {routes_t}, exported {routes_o})")
    if summary["mask_iou_mean"] < bar:
        failures.append(f"mean mask IoU {summary['mask_iou_mean']:.5f} < {bar}")
    return {"precision": precision, "summary": summary, "passed": not failures, "failures": failures,
            "per_image": per_image}
