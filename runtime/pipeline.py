"""The edge pipeline: preprocess → encoder → router → task alignment or nothing → decoder → masks.

Everything between the engines is numpy, and the engines are known only through
manifest.json, so this module runs where torch is not installed. The chain mirrors
``models.CASAM`` step for step (same preprocessing code, same prompt encoding, same
routing rule, same bilinear post-processing), which is what makes the runtime's routes
and masks equal to the PyTorch model's.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from casam_core.files import PathLike
from runtime.backends import Backend, Engine, Tensor, open_backend
from runtime.deployment import deployable
from runtime.engine_cache import EngineCache
from casam_core.errors import InputError, ManifestError
from casam_io.intensity import count_nonfinite, nonfinite_warning
from runtime.manifest import IDENTITY, MANIFEST_NAME, Manifest, check_task
from runtime.postprocess import masks_from_logits
from runtime.predictor import DEFAULT_BATCH, Capabilities, Result
from runtime.preprocess import Frame, Preprocessing, preprocess
from runtime.prompts import Prompts



class UnverifiedExportWarning(UserWarning):
    """The export folder was written with ``casam-export --no-verify``: its parity with the
    PyTorch model was never checked. Silence with ``-W ignore::runtime.pipeline.UnverifiedExportWarning``."""


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def check_parity(manifest: Manifest) -> None:
    """Refuse an export whose parity check failed; warn, once per process, about an unverified one.

    casam-export writes no manifest when verification fails, so ``passed: false`` means a
    manifest from an older casam or edited by hand. ``--no-verify`` exports load with one
    ``UnverifiedExportWarning`` (Python ``warnings``, so a library user can filter it and
    casam-infer shows it on stderr), repeated for neither the same folder nor the same manifest.
    """
    parity = manifest.data.get("parity")
    parity = parity if isinstance(parity, Mapping) else {}
    if parity.get("passed") is False:
        raise ManifestError(f"{manifest.folder / MANIFEST_NAME} records a failed parity check; "
                            "re-export the bundle (casam-export) before deploying it")
    if parity.get("passed") is True:
        return
    key = (str(manifest.folder.resolve()), str(manifest.data.get("created_utc")))
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"export {manifest.folder} was not verified against the PyTorch model (casam-export --no-verify); "
                  "re-export with verification before relying on its masks", UnverifiedExportWarning, stacklevel=3)


STAGES = ("preprocess", "encoder", "router", "align", "decoder", "postprocess", "total")


class _Timer:
    """Per-call stage timings (a local object, so concurrent predictions never share one)."""

    def __init__(self) -> None:
        self.ms = {stage: 0.0 for stage in STAGES}
        self.start = time.perf_counter()

    def stage(self, name: str) -> "_Stage":
        return _Stage(self.ms, name)

    def finish(self) -> dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self.start) * 1000.0
        return self.ms


class _Stage:
    def __init__(self, ms: dict[str, float], name: str) -> None:
        self.ms, self.name = ms, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.ms[self.name] += (time.perf_counter() - self.t0) * 1000.0


class Pipeline:
    """CA-SAM on exported engines (a ``runtime.predictor.VolumePredictor``). ``predict`` is
    safe to call from several threads."""

    def __init__(self, manifest: Manifest, backend: Backend, max_resident: int = 8, preload: bool = False) -> None:
        self.manifest_obj = manifest
        self.manifest: dict[str, Any] = manifest.data
        self.backend = backend
        self.task_names: list[str] = manifest.task_names
        self.preprocessing: Preprocessing = manifest.preprocessing
        self.max_prompts = manifest.max_prompts
        self.thresholds = np.array([t.threshold for t in manifest.tasks], dtype=np.float32)
        self.encoder = backend.load("encoder", manifest.graphs["encoder"].path)
        self.router = backend.load("router", manifest.graphs["router"].path) if self.task_names else None
        self.decoder = backend.load("decoder", manifest.graphs["decoder"].path)
        # The decoder taking a previous mask, where the export has one (older exports do not);
        # loaded on first use (``decoder_mask``), or now with ``preload``.
        self._mask_graph = manifest.graphs.get("decoder_mask")
        self._decoder_mask: Optional[Engine] = None
        self._mask_lock = threading.Lock()
        self.align_engines: EngineCache[str, Engine] = EngineCache(self._load_align, max_resident)
        self.calls: Counter[str] = Counter()  # engine key → runs, for tests and benchmarks
        self.capabilities = Capabilities(volumes=True, mask_input=self._mask_graph is not None,
                                         encoder_batch=DEFAULT_BATCH.get(str(backend.device), 1))
        self._calls_lock = threading.Lock()
        if preload:
            _ = self.decoder_mask  # served sessions answer the first correction at full speed
            for name in self.task_names[:max_resident]:
                self.align_engines.get(name)

    @property
    def decoder_mask(self) -> Optional[Engine]:
        """The ``decoder_mask`` engine (None where the export has none), loaded on first use:
        a run without corrections (casam-infer) never needs it, and its weights would stay
        resident (24 MB of casam-infer's peak RSS, bench/encoder_variants.py)."""
        if self._mask_graph is None:
            return None
        with self._mask_lock:
            if self._decoder_mask is None:
                self._decoder_mask = self.backend.load("decoder_mask", self._mask_graph.path)
        return self._decoder_mask

    @classmethod
    def from_manifest(
        cls,
        folder: PathLike,
        backend: str = "auto",
        max_resident: int = 8,
        preload: bool = False,
        manifest: Optional[Mapping[str, Any]] = None,
        verify: bool = True,
    ) -> "Pipeline":
        """Open an export folder, checking every engine file's sha256 against the manifest.

        ``manifest`` replaces ``folder/manifest.json``: an exporter can verify its engines
        through the runtime before it writes the final manifest. ``verify=False`` skips the
        hashing, for a caller that has just hashed the files itself. A manifest read from
        the folder goes through ``check_parity`` and ``runtime.deployment.deployable``.
        """
        loaded = Manifest.load(folder, manifest, verify=verify)
        if manifest is None:
            check_parity(loaded)
            # int8 verified on another CPU kernel class: re-run its verification set (runtime/deployment.py)
            loaded = deployable(loaded, backend, lambda m: cls(m, open_backend(backend, m)))
        return cls(loaded, open_backend(backend, loaded), max_resident=max_resident, preload=preload)

    # ----- stages ---------------------------------------------------------------------
    def _load_align(self, name: str) -> Engine:
        """Load a task's alignment engine, hashing its file first: every load, also a reload
        after the LRU evicted it, since the file may have changed since the folder was opened."""
        graph = self.manifest_obj.task(name).graph
        graph.verify()
        return self.backend.load(graph.key, graph.path)

    def _run(self, engine: Engine, feeds: Mapping[str, Tensor], keep: Sequence[str] = ()) -> dict[str, Tensor]:
        with self._calls_lock:
            self.calls[engine.key] += 1
        return engine.run(feeds, keep_on_device=keep)

    def _encode(self, batch: np.ndarray) -> Tensor:
        return self._run(self.encoder, {"image": batch}, keep=("embeddings",))["embeddings"]

    def _scores(self, embeddings: Tensor) -> np.ndarray:
        if self.router is None:
            return np.zeros((1, 0), dtype=np.float32)
        return np.asarray(self._run(self.router, {"embeddings": embeddings})["scores"], dtype=np.float32)

    def _align(self, embedding: Tensor, route: str) -> Tensor:
        if route == IDENTITY:
            return embedding
        engine = self.align_engines.get(route)
        return self._run(engine, {"embeddings": embedding}, keep=("aligned",))["aligned"]

    def _decoder_batches(self, embedding: Tensor, coords: np.ndarray, labels: np.ndarray,
                         mask_input: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """All prompts of one image, in as few decoder calls as the engine's maximum allows;
        with ``mask_input`` (checked by ``prompts``) on the ``decoder_mask`` graph."""
        engine = self.decoder if mask_input is None else self.decoder_mask
        lows, ious = [], []
        for start in range(0, coords.shape[0], self.max_prompts):
            stop = start + self.max_prompts
            feeds = {"embeddings": embedding, "point_coords": coords[start:stop], "point_labels": labels[start:stop]}
            if mask_input is not None:
                feeds["mask_input"] = mask_input[start:stop]
            out = self._run(engine, feeds)
            lows.append(np.asarray(out["low_res_masks"], dtype=np.float32))
            ious.append(np.asarray(out["iou_predictions"], dtype=np.float32).reshape(-1))
        return np.concatenate(lows), np.concatenate(ious)

    def choose(self, scores: np.ndarray, task: Optional[str] = None) -> str:
        """The route for one image's (N,) scores: argmin (first on ties) if ≤ its threshold."""
        if task is not None:
            return self.check_task(task)
        if scores.size == 0:
            return IDENTITY
        best = int(np.argmin(scores))
        return self.task_names[best] if scores[best] <= self.thresholds[best] else IDENTITY

    def check_task(self, task: str) -> str:
        return check_task(task, self.task_names)

    def prompts(self, frame: Frame, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
        """Checked prompts in original pixels → the decoder's (coords, labels) in the model frame."""
        if prompts.is_volume or prompts.slice_hw != frame.original_hw:
            prompts.check_image(frame.original_hw)
        if prompts.mask_input is not None and not self.capabilities.mask_input:
            raise InputError("this export's decoder takes no previous mask (mask_input); give boxes or points only")
        return prompts.encode(frame.scale_xy)

    # ----- public API -------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> tuple[np.ndarray, Frame]:
        """Preprocess and encode one image → (1×256×64×64 raw embedding, its Frame)."""
        x, frame = preprocess(image, self.preprocessing)
        return self.backend.to_numpy(self._encode(x)), frame

    def embed_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Frame]]:
        """B images in one encoder call → (B×256×64×64, frames)."""
        if not images:
            raise InputError("embed_batch needs at least one image")
        inputs, frames = zip(*(preprocess(img, self.preprocessing) for img in images))
        return self.backend.to_numpy(self._encode(np.concatenate(inputs))), list(frames)

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Already preprocessed B×3×S×S inputs → B×256×64×64 in one encoder call.

        For callers that preprocess in their own threads and share only the encoder run
        (casam-serve batches concurrent requests this way).
        """
        return self.backend.to_numpy(self._encode(inputs))

    def route(self, embeddings: Tensor, task: Optional[str] = None) -> tuple[str, np.ndarray, np.ndarray]:
        """One image's raw embedding → (route name or "identity", scores (N,), thresholds (N,))."""
        scores = self._scores(embeddings)
        if scores.shape[0] != 1:
            raise InputError(f"route takes one image's 1×256×64×64 embedding, got {scores.shape[0]} images")
        return self.choose(scores[0], task), scores[0], self.thresholds.copy()

    def align(self, embedding: Tensor, route: str) -> np.ndarray:
        """A raw 1×256×64×64 embedding through ``route``'s alignment layer (the identity
        returns it as is). Interactive sessions keep this, so each prompt runs the decoder
        alone: ``decode(aligned, frame, prompts, route="identity")``."""
        return self.backend.to_numpy(self._align(embedding, self.check_task(route)))

    def decode(self, embedding: Tensor, frame: Frame, prompts: Prompts,
               route: str = IDENTITY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A raw embedding and prompts in original pixels → (K×H×W masks, K×1×256×256 logits, (K,) IoU).

        A correction passes the previous call's logits as ``prompts.mask_input`` (with the
        box and every click so far), which runs the ``decoder_mask`` graph: refused with one
        InputError where the export has none (``capabilities.mask_input`` False)."""
        coords, labels = self.prompts(frame, prompts)
        low, iou = self._decoder_batches(self._align(embedding, self.check_task(route)), coords, labels,
                                         prompts.mask_input)
        return masks_from_logits(low, frame), low, iou

    def predict(
        self,
        image: np.ndarray,
        prompts: Prompts,
        task: Optional[str] = None,
        *,
        encode: Optional[Callable[[np.ndarray], Tensor]] = None,
    ) -> Result:
        """One image (H×W or H×W×C) and its prompts (``Prompts.for_image`` of it) → masks at
        the original size.

        A deeper than 8-bit image (a raw CT slice) gets the manifest's intensity handling,
        as ``Preprocessing.prepare`` would: the recorded window, never a silent min-max.
        ``task``: None routes by the ELBO scores, a task name forces that task, and
        "identity" runs plain SAM. All prompts go to the decoder in one batched call.
        ``encode`` replaces the encoder run (1×3×S×S → 1×256×64×64): casam-serve passes its
        batcher, so a served request is this very chain with a shared encoder call.
        """
        if task is not None:
            self.check_task(task)
        timer = _Timer()
        with timer.stage("preprocess"):
            x, frame = preprocess(image, self.preprocessing)
            coords, labels = self.prompts(frame, prompts)
            warnings = list(prompts.warnings)
            bad = count_nonfinite(np.asarray(image))
            if bad:  # shown black by preprocessing; say so once for this image
                warnings.append(nonfinite_warning(bad))
        with timer.stage("encoder"):
            embedding = (encode or self._encode)(x)
        with timer.stage("router"):
            scores = self._scores(embedding)[0]
            route = self.choose(scores, task)
        with timer.stage("align"):
            embedding = self._align(embedding, route)
        with timer.stage("decoder"):
            low, iou = self._decoder_batches(embedding, coords, labels, prompts.mask_input)
        with timer.stage("postprocess"):
            masks = masks_from_logits(low, frame)
        return Result(
            masks=masks,
            low_res_logits=low,
            iou=iou,
            route=route,
            scores={n: float(s) for n, s in zip(self.task_names, scores)},
            thresholds={n: float(t) for n, t in zip(self.task_names, self.thresholds)},
            timings_ms=timer.finish(),
            warnings=warnings,
        )

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "tasks": self.task_names, "max_prompts": self.max_prompts,
                "precision": self.manifest.get("precision"), "sam": self.manifest.get("sam", {}).get("model"),
                "mask_input": self.capabilities.mask_input,
                "intensity": self.preprocessing.intensity.to_dict(), "preprocessing": self.preprocessing.to_dict()}

    def read(self, path: PathLike, index: Optional[int] = None, axis: int = 2) -> tuple[np.ndarray, list[str]]:
        """Any file → (the 8-bit image these engines take, with the manifest's intensity, warnings)."""
        return self.preprocessing.read(path, index, axis)

