"""The trainer's side of importing a task package: load its modules, and the take-over check.

The bundle format (casam_bundle) checks a package's bytes, hashes, signature and
calibration without torch. What only torch can check lives here: that the weights load
into the modules their record describes, and what the new task would do to routing. A
malicious or broken package can capture images: a VAE whose scores are always low wins
every routing decision. So, given a reference set of the existing tasks' images, the import
scores it with the bundle's router plus the new task and measures the share of images the
new task would take.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from casam_core.files import PathLike
from casam_bundle import Bundle, BundleError, TaskRecord
from models.alignment import AlignmentLayer
from models.bundle_models import load_module_file, load_vae
from models.router import Router, choose_routes
from models.vae import TaskVAE
from trainer.data import image_files, load_images
from trainer.session import SessionOptions, open_bundle_session

#: Default largest share of the reference images a new task may take (--max-takeover).
DEFAULT_MAX_TAKEOVER = 0.10
_CHUNK = 16  # embeddings routed at once (16 × 4 MB)


def load_staged_modules(record: TaskRecord, staged: Path) -> tuple[AlignmentLayer, TaskVAE]:
    """The staged task's alignment layer and VAE; refused unless keys and shapes fit the record exactly."""
    a, v = record.alignment, record.vae
    layer = load_module_file(AlignmentLayer(num_blocks=int(a["num_blocks"]), dim=int(a["dim"])), staged / "alignment.safetensors")
    vae = load_module_file(TaskVAE(int(v["in_dim"]), int(v["latent_dim"]), int(v["hidden_dim"]), float(v["beta"])),
                           staged / "vae.safetensors")
    return layer, vae


@torch.no_grad()
def takeover_share(bundle: Bundle, record: TaskRecord, vae: TaskVAE, embeddings: torch.Tensor) -> dict[str, Any]:
    """Routes of the reference embeddings with and without the new task, and the share it takes."""
    names = bundle.task_names
    router = Router([load_vae(bundle, n) for n in names] + [vae], temperature=bundle.temperature).eval()
    thresholds = torch.tensor(bundle.thresholds() + [float(record.threshold)], dtype=torch.float32)
    routes = []
    for start in range(0, embeddings.shape[0], _CHUNK):
        _, scores = router(embeddings[start : start + _CHUNK].float())
        routes.append(choose_routes(scores, thresholds))
    route = torch.cat(routes)
    taken = int((route == len(names)).sum())
    return {"images": int(route.numel()), "taken": taken, "share": taken / max(int(route.numel()), 1)}


def package_vet(
    check_data: Optional[PathLike] = None,
    *,
    max_share: float = DEFAULT_MAX_TAKEOVER,
    strict: bool = False,
    session: SessionOptions = SessionOptions(),
    report: Optional[dict[str, Any]] = None,
) -> Callable[[Bundle, TaskRecord, Path], None]:
    """The check ``unpack_package`` runs on a staged task before committing it.

    Without ``check_data`` it only loads the modules. With it, a task that would take more
    than ``max_share`` of the reference images is refused when ``strict``, else warned about.
    The reference images are read with the bundle's recorded intensity handling, as its
    routers see images at the edge, so they are read in the check, once the bundle is known.
    """
    if not 0 <= max_share <= 1:
        raise BundleError(f"--max-takeover must be a share between 0 and 1, got {max_share}")
    if check_data is not None:
        image_files(check_data)  # cheap: a missing or empty folder fails before the import starts

    def vet(bundle: Bundle, record: TaskRecord, staged: Path) -> None:
        _, vae = load_staged_modules(record, staged)
        if check_data is None or not bundle.task_names:  # a first task takes nothing from anyone
            return
        samples = load_images(check_data, bundle.preprocessing.intensity)
        opened = open_bundle_session(bundle, session)
        embeddings = opened.cache.embeddings(samples, desc=f"embedding {Path(check_data).name}")
        result = takeover_share(bundle, record, vae, embeddings)
        if report is not None:
            report["takeover"] = result
        if result["share"] > max_share:
            message = (f"task {record.name!r} would take {result['taken']} of {result['images']} reference images "
                       f"({100 * result['share']:.1f}%, more than --max-takeover {100 * max_share:g}%) from the existing tasks")
            if strict:
                raise BundleError(f"{message}; refused (--strict)")
            print(f"casam-train: warning: {message}", file=sys.stderr, flush=True)

    return vet
