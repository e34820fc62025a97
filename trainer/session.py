"""The frozen SAM, its device and its embedding cache, set up once per command.

Training, evaluation and the continual protocol all need the same three things and the
same consistency check: a bundle is bound to one SAM model and checkpoint, and using it
with another would silently pair alignment layers with the wrong encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from casam_core.files import PathLike
from models.sam_loader import FrozenSam, check_preprocessing, load_frozen_sam
from casam_core.errors import InputError
from runtime.preprocess import Preprocessing
from casam_bundle import Bundle, BundleError
from trainer.embedding_cache import EmbeddingCache

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


@dataclass(frozen=True)
class SessionOptions:
    """Which frozen SAM every casam-train command loads, on which device, with which cache.

    One value instead of six parameters: the CLI builds it once from the session options,
    tests and the continual protocol pass it on (``frozen_sam`` reuses an already loaded SAM).
    """

    sam: str = "vit_b"
    checkpoint: Optional[PathLike] = None
    device: str = "auto"
    cache_dir: Optional[PathLike] = None
    quiet: bool = False
    frozen_sam: Optional[FrozenSam] = None


@dataclass
class Session:
    sam: FrozenSam
    device: torch.device
    cache: EmbeddingCache

    @property
    def checkpoint_sha256(self) -> str:
        return self.sam.checkpoint_sha256


def open_session(options: SessionOptions, preprocessing: Preprocessing) -> Session:
    """Load (or reuse) the frozen SAM on the asked device with a cache for ``preprocessing``."""
    dev = resolve_device(options.device)
    check_preprocessing(options.sam, preprocessing)  # before loading: a size mismatch needs no weights
    frozen = options.frozen_sam
    if frozen is None:
        frozen = load_frozen_sam(options.sam, Path(options.checkpoint) if options.checkpoint else None)
    if frozen.name != options.sam:
        raise InputError(f"the loaded SAM is {frozen.name!r}, but {options.sam!r} was asked for")
    frozen.model.to(dev)
    cache = EmbeddingCache(frozen.model.image_encoder, frozen.checkpoint_sha256, preprocessing, options.cache_dir, dev,
                           quiet=options.quiet, batch_size=4 if dev.type == "cuda" else 1)
    return Session(frozen, dev, cache)


def open_bundle_session(bundle: Bundle, options: SessionOptions = SessionOptions()) -> Session:
    """A session on the bundle's own SAM (``options.sam`` is ignored); the checkpoint's sha256
    must match the bundle's."""
    session = open_session(replace(options, sam=bundle.sam_model), bundle.preprocessing)
    check_bundle_sam(bundle, session.sam.name, session.checkpoint_sha256)
    return session
