"""Building a frozen SAM: the official checkpoints, or a tiny seeded one for tests.

The variant table ``SAM_SPECS`` is data: each row names its encoder configuration (SAM's
ViT, MobileSAM's TinyViT or EfficientViT-SAM's EfficientViT-L), the input it expects (size,
pixel mean and std, resize rule: they become the bundle's and the manifest's
preprocessing), and where its official weights come from. The prompt encoder and mask
decoder are segment-anything's classes for every variant, and every encoder ends in the
same 256×64×64 embedding, so alignment layers, router and decoder never depend on the
variant. Checkpoints are untrusted files: they are read as safetensors or with
``torch.load(weights_only=True)``, never unpickled.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from casam_core.files import PathLike, atomic_path, sha256_file
from casam_io.intensity import Intensity
from models.encoders import EfficientViTConfig, TinyViTConfig, ViTConfig
from models.errors import CheckpointError, UnknownModelError
from models.sam_import import load_modeling
from runtime.preprocess import PIXEL_MEAN, PIXEL_STD, Preprocessing

log = logging.getLogger(__name__)

EncoderConfig = Union[ViTConfig, TinyViTConfig, EfficientViTConfig]


@dataclass(frozen=True)
class SamSpec:
    """One SAM variant: its encoder, its input, its decoder widths, and its official weights.

    ``seeded`` rows are test configurations: no official checkpoint, seeded random weights.
    ``norm_eps`` overrides every LayerNorm/BatchNorm epsilon of the whole model after it is
    built, as EfficientViT-SAM's release does (1e-6), so its checkpoints compute as trained.
    A ``sha256`` of None means none is published: the file is never downloaded unchecked.
    """

    encoder: EncoderConfig
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    image_size: int = 1024
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    resize: str = "longest"
    norm_eps: Optional[float] = None
    url: Optional[str] = None
    sha256: Optional[str] = None
    seeded: bool = False


# The tiny rows keep each family's architecture at small widths and depths, random weights:
# fast enough for CI and the demo. Their prompt/decoder width stays 256 because the
# alignment layer is defined at 256. The TinyViT one keeps a 320-wide last stage, the width
# at which MobileSAM's last merge keeps the resolution (its reference code keys on it).
_TINY_DECODER = dict(decoder_mlp_dim=256, iou_head_hidden_dim=64, seeded=True)
_MOBILE_SAM = TinyViTConfig()
_L0 = EfficientViTConfig()
SAM_SPECS: Mapping[str, SamSpec] = {
    "vit_b": SamSpec(
        ViTConfig(768, 12, 12, (2, 5, 8, 11)),
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": SamSpec(
        ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": SamSpec(
        ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "tiny": SamSpec(ViTConfig(32, 2, 2, (1,), mlp_ratio=2.0), **_TINY_DECODER),
    # MobileSAM (TinyViT-5M, 1024 px). The file is the one in the official repository
    # (git blob 7ef2d090…, 40 728 226 bytes); its sha256 is the one several public
    # projects pin for it.
    "mobile_sam": SamSpec(
        _MOBILE_SAM,
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    ),
    # EfficientViT-SAM L0/L1 (512 px): the release files linked from mit-han-lab/efficientvit's
    # EfficientViT-SAM README; sha256 values as public download manifests pin them.
    "efficientvit_sam_l0": SamSpec(
        _L0, image_size=512, norm_eps=1e-6,
        url="https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/efficientvit_sam_l0.pt",
        sha256="c4f994b01a16d48bcf2fbbb089448cfbf58fae5811edfa8113c953b8b8cc64b8",
    ),
    "efficientvit_sam_l1": SamSpec(
        EfficientViTConfig(depths=(1, 1, 1, 6, 6), neck_depth=8), image_size=512, norm_eps=1e-6,
        url="https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/efficientvit_sam_l1.pt",
        sha256="fa151df2b9b96896accd505470755cdd293a4c50cdabac95478f3fbd86d9152b",
    ),
    "tiny_mobile_sam": SamSpec(
        TinyViTConfig(embed_dims=(16, 24, 32, 320), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                      mlp_ratio=1.0, mbconv_expand_ratio=2.0, num_classes=8),
        **_TINY_DECODER,
    ),
    "tiny_efficientvit": SamSpec(
        EfficientViTConfig(widths=(8, 16, 24, 32, 64), depths=(1, 1, 1, 1, 1), head_dim=16, neck_depth=1),
        image_size=512, norm_eps=1e-6, **_TINY_DECODER,
    ),
}

TINY_SEED = 0
#: SAM's own ViT input size; other variants take theirs from ``SamSpec.image_size``.
IMAGE_SIZE = 1024
PROMPT_DIM = 256
TINY_CHECKPOINT_SHA = "untrained-tiny-seed-{seed}"
#: What identifies a seeded model's weights: its name and seed (never a real sha256).
UNTRAINED_CHECKPOINT_ID = "untrained-{name}-seed-{seed}"


def known_models() -> list[str]:
    return list(SAM_SPECS)


def sam_spec(name: str) -> SamSpec:
    """The table row of ``name``; an unknown name is refused with the known ones listed."""
    if name not in SAM_SPECS:
        raise UnknownModelError(
            f"unknown SAM model {name!r}; known models: {', '.join(known_models())}"
        )
    return SAM_SPECS[name]


_spec = sam_spec


def sam_preprocessing(name: str, resize: Optional[str] = None, intensity: Optional[Intensity] = None) -> Preprocessing:
    """The input ``name`` expects (size, mean, std, resize rule), as a new bundle records it."""
    spec = sam_spec(name)
    return Preprocessing(resize=resize or spec.resize, size=spec.image_size, mean=spec.pixel_mean,  # type: ignore[arg-type]
                         std=spec.pixel_std, intensity=intensity or Intensity())


def check_preprocessing(name: str, prep: Preprocessing) -> None:
    """Refuse a recorded preprocessing whose size, mean or std is not what ``name`` takes."""
    spec = sam_spec(name)
    want = (spec.image_size, tuple(spec.pixel_mean), tuple(spec.pixel_std))
    if (prep.size, tuple(prep.mean), tuple(prep.std)) != want:
        raise CheckpointError(
            f"SAM {name!r} takes {spec.image_size}² images normalised with mean {list(spec.pixel_mean)} and std "
            f"{list(spec.pixel_std)}; the recorded preprocessing has {prep.size}², {list(prep.mean)}, {list(prep.std)}"
        )


def untrained_seed(name: str, checkpoint_id: str) -> Optional[int]:
    """The seed of a seeded model's recorded checkpoint id, or None for real weights."""
    if not sam_spec(name).seeded:
        return None
    found = re.fullmatch(r"untrained-(.+)-seed-(\d+)", checkpoint_id)
    return int(found.group(2)) if found and found.group(1) == name else None


def build_sam_architecture(name: str) -> torch.nn.Module:
    """Instantiate SAM ``name``: the table's encoder, segment-anything's prompt encoder and
    mask decoder, default init. The prompt frame is the encoder's input frame."""
    spec = sam_spec(name)
    modeling = load_modeling()
    size, grid = spec.image_size, 64
    sam = modeling.Sam(
        image_encoder=spec.encoder.build(size),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=PROMPT_DIM, image_embedding_size=(grid, grid), input_image_size=(size, size), mask_in_chans=16,
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
        pixel_mean=list(spec.pixel_mean),
        pixel_std=list(spec.pixel_std),
    )
    if spec.norm_eps is not None:
        for module in sam.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                module.eps = spec.norm_eps
    return sam


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
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights one level down
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
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
    if spec.sha256 is None:
        raise CheckpointError(f"no published sha256 for {name}'s checkpoint, so it is not downloaded unchecked; "
                              f"download {spec.url} yourself and pass --checkpoint PATH")
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


def build_tiny_sam(seed: int = TINY_SEED, name: str = "tiny") -> torch.nn.Module:
    """A seeded test configuration (``tiny`` by default): its architecture, seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam_architecture(name)


def load_frozen_sam(
    name: str,
    checkpoint: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    tiny_seed: int = TINY_SEED,
) -> FrozenSam:
    """Build SAM ``name`` and load its weights; every parameter frozen, eval mode.

    A seeded row (``tiny``, ``tiny_mobile_sam``…) without a checkpoint is the untrained
    seeded model used by tests and the demo. Otherwise a local ``checkpoint`` wins; without
    one the official file is downloaded once into the cache where the network allows.
    """
    spec = sam_spec(name)
    if spec.seeded and checkpoint is None:
        log.warning("%s SAM: untrained random weights (seed %d), for tests and demos only", name, tiny_seed)
        return FrozenSam(freeze(build_tiny_sam(tiny_seed, name)), name,
                         UNTRAINED_CHECKPOINT_ID.format(name=name, seed=tiny_seed), True)
    if checkpoint is None:
        if not download:
            raise CheckpointError(f"no checkpoint given for {name}; pass --checkpoint PATH")
        path = download_checkpoint(name, cache_dir)
        verified_sha = spec.sha256  # just checked by download_checkpoint: no second pass over GBs
    else:
        path, verified_sha = Path(checkpoint), None
    state = read_state_dict(path)
    sam = build_sam_architecture(name)
    load_state_dict_strict(sam, state, f"checkpoint {path}")
    return FrozenSam(freeze(sam), name, verified_sha or sha256_file(path), untrained=False)
