"""Building a frozen SAM: the official ViT checkpoints, or a tiny seeded one for tests.

Every model comes from segment-anything's own classes, so an official checkpoint and the
``tiny`` test model go through exactly the same code. Checkpoints are untrusted files:
they are read as safetensors or with ``torch.load(weights_only=True)``, never unpickled.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Optional

import torch

from models.errors import CheckpointError, UnknownModelError
from models.sam_import import load_modeling
from casam_core.files import PathLike, atomic_path, sha256_file

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SamSpec:
    """Encoder hyper-parameters of one SAM variant, plus where its weights come from."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    mlp_ratio: float = 4.0
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    url: Optional[str] = None
    sha256: Optional[str] = None


SAM_SPECS: Mapping[str, SamSpec] = {
    "vit_b": SamSpec(
        768, 12, 12, (2, 5, 8, 11),
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": SamSpec(
        1024, 24, 16, (5, 11, 17, 23),
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": SamSpec(
        1280, 32, 16, (7, 15, 23, 31),
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    # Same classes, small dims, random weights: fast enough for CI and the demo. The
    # prompt/decoder width stays 256 because the alignment layer is defined at 256.
    "tiny": SamSpec(32, 2, 2, (1,), mlp_ratio=2.0, decoder_mlp_dim=256, iou_head_hidden_dim=64),
}

TINY_SEED = 0
IMAGE_SIZE = 1024
PROMPT_DIM = 256
TINY_CHECKPOINT_SHA = "untrained-tiny-seed-{seed}"


def known_models() -> list[str]:
    return list(SAM_SPECS)


def _spec(name: str) -> SamSpec:
    if name not in SAM_SPECS:
        raise UnknownModelError(
            f"unknown SAM model {name!r}; known models: {', '.join(known_models())}"
        )
    return SAM_SPECS[name]


def build_sam_architecture(name: str) -> torch.nn.Module:
    """Instantiate SAM ``name`` with segment-anything's classes and default init."""
    spec = _spec(name)
    modeling = load_modeling()
    patch = 16
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=IMAGE_SIZE,
            mlp_ratio=spec.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(spec.global_attn_indexes),
            window_size=14,
            out_chans=PROMPT_DIM,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(IMAGE_SIZE // patch, IMAGE_SIZE // patch),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_DIM, mlp_dim=spec.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=PROMPT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling arbitrary objects.

    Accepts ``.safetensors`` and the official ``.pth`` files (a plain dict of tensors,
    which ``weights_only=True`` admits). Anything else is refused with a clear message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises retrying with weights_only=False, i.e. running the
        # file's code: never repeat that; name what it tried to load instead.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(
            f"checkpoint {path} is not a plain tensor checkpoint; refused for safety"
            + (f" (it holds a pickled {found.group(1)})" if found else "")
        ) from None
    except Exception as exc:  # noqa: BLE001 - every other failure mode means the same thing here
        raise CheckpointError(
            f"checkpoint {path} is unreadable or truncated ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose error names the missing and unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def _few(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if wrong_shape:
            parts.append(
                "wrong shapes: "
                + _few([f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in wrong_shape])
            )
        raise CheckpointError(f"{what} does not fit the architecture; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CASAM_CACHE", Path.home() / ".cache" / "casam"))


def download_checkpoint(name: str, cache_dir: Optional[PathLike] = None, timeout: float = 15.0) -> Path:
    """Fetch the official checkpoint once into the cache and check its sha256.

    The download goes to a temporary file that is renamed only after the hash matches, so
    an interrupted or tampered download never becomes a cached checkpoint.
    """
    spec = _spec(name)
    if spec.url is None:
        raise CheckpointError(f"model {name!r} has no official checkpoint to download")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / Path(spec.url).name
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    hint = f"download {spec.url} yourself and pass --checkpoint PATH"
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(spec.url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                from tqdm import tqdm

                with tqdm(total=total, unit="B", unit_scale=True, desc=f"SAM {name}") as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
            got = sha256_file(tmp)
            if got != spec.sha256:
                raise CheckpointError(
                    f"downloaded {name} checkpoint has sha256 {got}, expected {spec.sha256}; {hint}"
                )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CheckpointError(f"no checkpoint for {name} and it cannot be downloaded ({exc}); {hint}") from exc
    return target


@dataclass
class FrozenSam:
    """A loaded SAM together with what identifies its weights."""

    model: torch.nn.Module
    name: str
    checkpoint_sha256: str
    untrained: bool


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def build_tiny_sam(seed: int = TINY_SEED) -> torch.nn.Module:
    """The ``tiny`` SAM: segment-anything classes, small dims, seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam_architecture("tiny")


def load_frozen_sam(
    name: str,
    checkpoint: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    tiny_seed: int = TINY_SEED,
) -> FrozenSam:
    """Build SAM ``name`` and load its weights; every parameter frozen, eval mode.

    ``tiny`` takes no checkpoint: it is the untrained seeded model used by tests and the
    demo. For the ViT models a local ``checkpoint`` wins; without one the official file is
    downloaded once into the cache where the network allows.
    """
    _spec(name)
    if name == "tiny":
        if checkpoint is not None:
            sam = build_sam_architecture("tiny")
            path = Path(checkpoint)
            load_state_dict_strict(sam, read_state_dict(path), f"checkpoint {path}")
            return FrozenSam(freeze(sam), name, sha256_file(path), untrained=False)
        log.warning("tiny SAM: untrained random weights (seed %d), for tests and demos only", tiny_seed)
        return FrozenSam(freeze(build_tiny_sam(tiny_seed)), name, TINY_CHECKPOINT_SHA.format(seed=tiny_seed), True)
    if checkpoint is None:
        if not download:
            raise CheckpointError(f"no checkpoint given for {name}; pass --checkpoint PATH")
        path = download_checkpoint(name, cache_dir)
        verified_sha = _spec(name).sha256  # just checked by download_checkpoint: no second pass over GBs
    else:
        path, verified_sha = Path(checkpoint), None
    state = read_state_dict(path)
    sam = build_sam_architecture(name)
    load_state_dict_strict(sam, state, f"checkpoint {path}")
    return FrozenSam(freeze(sam), name, verified_sha or sha256_file(path), untrained=False)
