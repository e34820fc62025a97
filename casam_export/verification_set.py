"""The verification set an int8 export ships (``runtime/deployment.py`` re-runs it on other CPUs).

Up to ``DEFAULT_SET_SIZE`` of the export's verification images (the tasks' held-out
images first, then --verify-images site images; ``verify.verification_images``), each
stored as the deployment receives it after intensity handling, downscaled to at most
``MAX_SIDE`` pixels on its longest side and 8-bit, with three seeded boxes and the fp32
PyTorch model's outputs on exactly that stored image: route, scores, an embedding summary
(mean, std, max |x|) and the low-resolution masks (bit-packed). The first image also holds
the masks of every task forced, so every alignment graph is checked at least once.

Size: 8 images of ≤ 384×384×3 bytes and 3 masks of 256×256 bits each hold at most 3.6 MB
before compression; ``SIZE_CAP`` (8 MiB) refuses anything larger, e.g. a large --verify-count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from casam_bundle import Bundle
from casam_core.files import atomic_write_bytes, sha256_bytes
from casam_core.names import IDENTITY
from casam_export.errors import ExportError
from casam_export.parity import VerificationImages, prompts_for
from models.casam import routes_to_names
from models.router import IDENTITY_INDEX
from runtime.deployment import VerificationCase, VerificationSet
from runtime.prompts import Prompts
from runtime.preprocess import Preprocessing, frame_for, preprocess

DEFAULT_SET_SIZE = 8
MAX_SIDE = 384
SIZE_CAP = 8 << 20
FILE_STEM = "verification"


def stored_image(image: np.ndarray) -> np.ndarray:
    """``image`` as the set stores it: 8-bit (a 16-bit picture min-max scaled, as
    preprocessing scales it), grey or RGB, longest side ≤ ``MAX_SIDE``."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = np.zeros(img.shape, np.uint8) if hi <= lo else ((img - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    h, w = img.shape[:2]
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    return np.ascontiguousarray(img)


def _masks(model: nn.Module, embedding: torch.Tensor, route: str, frame: Any, boxes: np.ndarray) -> np.ndarray:
    """fp32 low-resolution masks (logits > 0) of ``boxes`` with ``route``'s alignment."""
    index = IDENTITY_INDEX if route == IDENTITY else model.task_names.index(route)
    coords, labels = Prompts.for_image(frame.original_hw, boxes=boxes).encode(frame.scale_xy)
    with torch.no_grad():
        low, _ = model.decoder(model.align(embedding, index), torch.from_numpy(coords), torch.from_numpy(labels))
    return low.numpy()[:, 0] > 0


def reference_case(model: nn.Module, prep: Preprocessing, image: np.ndarray, label: str, seed: int,
                   force_all: bool) -> VerificationCase:
    """One stored image and the fp32 model's outputs on it."""
    stored = stored_image(image)
    boxes = prompts_for(stored, seed)["boxes"]
    x, _ = preprocess(stored, prep)
    frame = frame_for(stored.shape[0], stored.shape[1], prep)
    with torch.no_grad():
        embedding = model.encode(torch.from_numpy(x))
        _, scores, routes = model.route(embedding)
    route = routes_to_names(routes, model.task_names)[0]
    forced = {t: _masks(model, embedding, t, frame, boxes) for t in model.task_names if force_all and t != route}
    e = embedding.numpy()
    return VerificationCase(stored, label, boxes, route, scores.numpy()[0], _masks(model, embedding, route, frame, boxes),
                            forced, (float(e.mean()), float(e.std()), float(np.abs(e).max())))


def write_verification_set(out: Path, bundle: Bundle, model: nn.Module, checks: VerificationImages,
                           count: int = DEFAULT_SET_SIZE) -> dict[str, Any]:
    """Compute and write the set (content-named, atomically); its manifest entry."""
    if count < 1:
        raise ExportError(f"--verify-count must be ≥ 1, got {count}")
    labels = checks.labels_or_default()
    picks = np.unique(np.linspace(0, len(checks.images) - 1, min(count, len(checks.images))).round().astype(int))
    cases = [reference_case(model.eval(), bundle.preprocessing, checks.images[i], labels[i], seed=int(i),
                            force_all=n == 0) for n, i in enumerate(picks)]
    thresholds = np.array([float(r.threshold) for r in bundle.tasks], np.float32)
    data = VerificationSet(list(model.task_names), thresholds, cases).to_bytes()
    if len(data) > SIZE_CAP:
        raise ExportError(f"the int8 verification set would take {len(data) / 2**20:.1f} MiB, over its "
                          f"{SIZE_CAP >> 20} MiB cap; pass a smaller --verify-count")
    digest = sha256_bytes(data)
    name = f"{FILE_STEM}-{digest[:12]}.npz"
    atomic_write_bytes(out / name, data)
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.label] = counts.get(c.label, 0) + 1
    return {"file": name, "sha256": digest, "bytes": len(data), "images": len(cases), "labels": counts,
            "source": checks.source, "max_side": MAX_SIDE, "size_cap_bytes": SIZE_CAP,
            "reference": "pytorch fp32 (models.CASAM)"}
