"""Frozen-encoder embeddings, computed once and kept on disk.

SAM's encoder is frozen and costs far more than everything a task trains, so an image is
encoded once and its embedding reused in every epoch, for VAE training, calibration and
evaluation, and by later runs. An entry is keyed by the checkpoint's sha256, the
preprocessing and the image's decoded content, so a different model, resize mode or pixel
change can never return a stale embedding. Preprocessing is ``runtime.preprocess``, the
same numpy code the edge runtime runs. Entries are fp16 ``.npy`` files written atomically
(a unique temporary file renamed into place), so ranks and runs sharing a cache folder
never see a torn entry, even when two of them write the same one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from casam_core.files import PathLike
from models.sam_loader import default_cache_dir as casam_cache_dir
from casam_core.files import atomic_path
from runtime.preprocess import Preprocessing, preprocess
from trainer.data import Sample
from trainer.distributed import SINGLE, World

EMBEDDING_SHAPE = (256, 64, 64)


def default_cache_dir() -> Path:
    return casam_cache_dir() / "embeddings"


def encoder_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 (or fp16) autocast for the frozen encoder on CUDA; a no-op on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class EmbeddingCache:
    """Embeddings of samples under one (checkpoint, preprocessing) pair."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        checkpoint_sha256: str,
        preprocessing: Preprocessing,
        cache_dir: Optional[PathLike] = None,
        device: torch.device = torch.device("cpu"),
        enabled: bool = True,
        quiet: bool = False,
        batch_size: int = 1,
    ) -> None:
        self.encoder = encoder
        self.preprocessing = preprocessing
        self.device = device
        self.enabled = enabled
        self.quiet = quiet
        self.batch_size = batch_size
        self.root = Path(cache_dir) if cache_dir else default_cache_dir()
        prefix = json.dumps({"checkpoint": checkpoint_sha256, "preprocessing": preprocessing.to_dict()}, sort_keys=True)
        self._prefix = hashlib.sha256(prefix.encode()).hexdigest()
        self.hits = 0
        self.misses = 0

    def path(self, image_hash: str) -> Path:
        key = hashlib.sha256(f"{self._prefix}|{image_hash}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def _read(self, path: Path) -> Optional[np.ndarray]:
        if not self.enabled or not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            return None  # a damaged entry is recomputed and rewritten
        return array if array.shape == EMBEDDING_SHAPE else None

    def _write(self, path: Path, array: np.ndarray) -> None:
        if not self.enabled:
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw images → B×256×64×64 float32 embeddings (no cache)."""
        batch = np.concatenate([preprocess(im, self.preprocessing)[0] for im in images], axis=0)
        with encoder_autocast(self.device):
            out = self.encoder(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()

    def embeddings(self, samples: Sequence[Sample], desc: str = "embedding", world: World = SINGLE) -> torch.Tensor:
        """N×256×64×64 fp16 CPU tensor, encoding only the samples not yet cached.

        Under torchrun the cache is filled in shards: each rank encodes its share of the
        samples into the shared cache folder, and once every rank is done, all read all.
        The shares are fixed by sample position, not by what a rank finds missing, so
        they cannot overlap or leave a gap while other ranks are writing. An entry a rank
        cannot read back (another node's cache folder, a disabled cache) is encoded again.
        """
        if not world.parallel:
            return self._embeddings(samples, desc)
        hits, misses = self.hits, self.misses
        self._embeddings([samples[i] for i in world.share(len(samples))], desc, show=world.is_main, keep=False)
        world.barrier()
        out = self._embeddings(samples, desc, show=False)
        # Counted over all ranks: how many images were encoded, and how many were reused.
        encoded = int(world.sum({"encoded": self.misses - misses})["encoded"])
        self.hits, self.misses = hits + max(0, len(samples) - encoded), misses + encoded
        return out

    def _embeddings(self, samples: Sequence[Sample], desc: str, show: bool = True, keep: bool = True) -> Optional[torch.Tensor]:
        """Read or encode ``samples``; ``keep=False`` only fills the cache (no N×2 MB array)."""
        out = np.empty((len(samples) if keep else 0,) + EMBEDDING_SHAPE, np.float16)
        todo: list[int] = []
        for i, s in enumerate(samples):
            cached = self._read(self.path(s.image_hash))
            if cached is None:
                todo.append(i)
            elif keep:
                out[i] = cached
        self.hits += len(samples) - len(todo)
        self.misses += len(todo)
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=self.quiet or not show or not todo, leave=False)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            encoded = self.encode([samples[i].image() for i in chunk]).astype(np.float16)
            for i, emb in zip(chunk, encoded):
                if keep:
                    out[i] = emb
                self._write(self.path(samples[i].image_hash), emb)
            bar.update(len(chunk))
        bar.close()
        return torch.from_numpy(out) if keep else None
