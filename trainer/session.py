"""The frozen SAM, its device and its embedding cache, set up once per command.

Training, evaluation and the continual protocol all need the same three things and the
same consistency check: a bundle is bound to one SAM model and checkpoint, and using it
with another would silently pair alignment layers with the wrong encoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from models.sam_loader import FrozenSam, load_frozen_sam
from casam_core.errors import InputError
from runtime.preprocess import Preprocessing
from casam_bundle import Bundle, BundleError
from trainer.embedding_cache import EmbeddingCache

PathLike = Union[str, os.PathLike]
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise InputError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was given but torch sees no CUDA device")
    return torch.device(name)


def check_bundle_sam(bundle: Bundle, sam_name: str, checkpoint_sha256: Optional[str] = None) -> None:
    """Refuse a SAM model or checkpoint other than the one the bundle was trained with."""
    if bundle.sam_model != sam_name:
        raise BundleError(
            f"bundle {bundle.root} was trained with SAM {bundle.sam_model!r}, not {sam_name!r}; "
            f"pass --sam {bundle.sam_model} (every task in a bundle shares one frozen SAM)"
        )
    if checkpoint_sha256 is not None and checkpoint_sha256 != bundle.checkpoint_sha256:
        raise BundleError(
            f"bundle {bundle.root} was trained with checkpoint sha256 {bundle.checkpoint_sha256[:16]}…, "
            f"but the given checkpoint has sha256 {checkpoint_sha256[:16]}…; use the bundle's checkpoint"
        )


@dataclass
class Session:
    sam: FrozenSam
    device: torch.device
    cache: EmbeddingCache

    @property
    def checkpoint_sha256(self) -> str:
        return self.sam.checkpoint_sha256


def open_session(
    sam_name: str,
    checkpoint: Optional[PathLike],
    preprocessing: Preprocessing,
    device: str = "auto",
    cache_dir: Optional[PathLike] = None,
    quiet: bool = False,
    sam: Optional[FrozenSam] = None,
) -> Session:
    """Load (or reuse) the frozen SAM on ``device`` with a cache for ``preprocessing``."""
    dev = resolve_device(device)
    frozen = sam if sam is not None else load_frozen_sam(sam_name, Path(checkpoint) if checkpoint else None)
    if frozen.name != sam_name:
        raise InputError(f"the loaded SAM is {frozen.name!r}, but {sam_name!r} was asked for")
    frozen.model.to(dev)
    cache = EmbeddingCache(frozen.model.image_encoder, frozen.checkpoint_sha256, preprocessing, cache_dir, dev,
                           quiet=quiet, batch_size=4 if dev.type == "cuda" else 1)
    return Session(frozen, dev, cache)


def open_bundle_session(bundle: Bundle, checkpoint: Optional[PathLike] = None, device: str = "auto",
                        cache_dir: Optional[PathLike] = None, quiet: bool = False,
                        sam: Optional[FrozenSam] = None) -> Session:
    """A session on the bundle's own SAM; the checkpoint's sha256 must match the bundle's."""
    session = open_session(bundle.sam_model, checkpoint, bundle.preprocessing, device, cache_dir, quiet, sam)
    check_bundle_sam(bundle, session.sam.name, session.checkpoint_sha256)
    return session
