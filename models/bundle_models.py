"""A bundle's files as torch modules: alignment layers, VAEs, the router and the CASAM model.

The bundle format (``casam_bundle``) knows files, hashes and records but not torch; this
module is where the two meet, so that the trainer, the exporter and the benchmarks build
the model of a bundle in exactly one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from casam_bundle import Bundle, BundleError
from models.alignment import AlignmentLayer
from models.casam import CASAM
from models.errors import CheckpointError
from models.router import Router
from models.sam_loader import load_state_dict_strict
from models.vae import TaskVAE
from casam_core.files import atomic_path


def save_module(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as safetensors, written atomically (never pickled)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_module_file(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``module`` with the weights of a safetensors file whose keys and shapes must fit exactly."""
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise BundleError(f"{path} is unreadable or truncated ({exc})") from exc
    try:
        load_state_dict_strict(module, state, str(path))
    except CheckpointError as exc:
        raise BundleError(str(exc)) from exc
    return module.eval()


def load_alignment(bundle: Bundle, name: str) -> AlignmentLayer:
    record = bundle.task(name)
    layer = AlignmentLayer(num_blocks=int(record.alignment["num_blocks"]), dim=int(record.alignment["dim"]))
    return load_module_file(layer, bundle.task_dir(name) / "alignment.safetensors")


def load_vae(bundle: Bundle, name: str) -> TaskVAE:
    v = bundle.task(name).vae
    vae = TaskVAE(int(v["in_dim"]), int(v["latent_dim"]), int(v["hidden_dim"]), float(v["beta"]))
    return load_module_file(vae, bundle.task_dir(name) / "vae.safetensors")


def build_router(bundle: Bundle, names: Optional[Sequence[str]] = None) -> Router:
    names = list(names) if names is not None else bundle.task_names
    return Router([load_vae(bundle, n) for n in names], temperature=bundle.temperature)


def build_model(
    bundle: Bundle,
    sam: torch.nn.Module,
    names: Optional[Sequence[str]] = None,
    candidate: Optional[tuple[str, AlignmentLayer, TaskVAE, float]] = None,
) -> CASAM:
    """The CASAM model of the bundle's tasks (all of them, or the first ``names``).

    ``candidate`` (name, layer, vae, threshold) is a task not yet committed: it goes last
    and replaces a committed task of the same name, so the trainer can evaluate a task
    exactly as the routed model will see it before it commits it.
    """
    names = list(names) if names is not None else bundle.task_names
    layers = {n: load_alignment(bundle, n) for n in names}
    vaes = {n: load_vae(bundle, n) for n in names}
    thresholds = {n: float(bundle.task(n).threshold) for n in names}
    if candidate is not None:
        name, layer, vae, threshold = candidate
        for table in (layers, vaes, thresholds):
            table.pop(name, None)
        layers[name], vaes[name], thresholds[name] = layer, vae, float(threshold)
    order = list(layers)
    return CASAM(
        sam,
        order,
        [layers[n] for n in order],
        Router([vaes[n] for n in order], temperature=bundle.temperature),
        [thresholds[n] for n in order],
    ).eval()
