"""One interactive session: an image or a volume, its route, and each label's steps per slice.

The chain splits where SAM meant it to. The first prompt on an image (or on a volume slice)
runs the encoder, the router and the routed alignment layer once and caches the aligned
embedding (``EmbeddingCache``); every later box, click or undo on it runs the decoder alone.

Routing follows casam-infer. An image takes the argmin task if its score is under τ, else
plain SAM. A volume takes one route for all its slices: the mean score over the prompted
slice and ``route_neighbours`` slices on each side (all encoded anyway, as the
neighbourhood an annotator scrolls through next), checked against τ, decided at the first
prompt and kept for the session, so a structure's slices can never flip between tasks.

Clicks refine the current mask as SAM's own predictor does: the box, every click so far,
and the previous low-res logits as ``mask_input`` when the export's decoder takes one
(``capabilities.mask_input``). "Propagate" walks outward from a slice with the rule of
casam-infer's volume mode (``runtime.volume.next_box``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from casam_core.errors import InputError
from casam_core.names import IDENTITY, check_label_name
from runtime.predictor import VolumePredictor
from runtime.preprocess import preprocess
from runtime.prompts import Prompts
from runtime.sessions.embedding_cache import EmbeddingCache, SliceEmbedding
from runtime.sessions.history import SliceHistory, Step
from runtime.sessions.source import SessionSource
from runtime.volume import Propagation, next_box

MAX_LABELS = 255  # uint8 label volumes, as casam-infer writes


@dataclass(frozen=True)
class SessionOptions:
    """``task``: force a task (or "identity") instead of routing. ``route_neighbours``:
    slices on each side of the first prompted slice that vote on a volume's route.
    ``prefetch``: slices on each side encoded in the background after each prompt."""

    task: Optional[str] = None
    # One slice each side: three votes steady a volume's route against one odd slice, while
    # the first prompt waits for three encoder runs, not five (about 13 s each for vit_b on 2 cores).
    route_neighbours: int = 1
    prefetch: int = 2
    propagation: Propagation = field(default_factory=Propagation)


@dataclass(frozen=True)
class RouteDecision:
    """Which alignment layer took the image or volume, and why."""

    route: str
    mode: str  # "image", "volume" or "forced"
    scores: dict[str, float]
    thresholds: dict[str, float]
    slices: tuple[int, ...]  # the slices whose scores decided it

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.route, "mode": self.mode, "scores": self.scores, "thresholds": self.thresholds,
                "slices": list(self.slices), "plain_sam": self.route == IDENTITY}


@dataclass
class Interaction:
    """What one interaction produced: the label's mask on each slice it changed (None: the
    slice is empty again), the route, and where the time went."""

    label: str
    slice: int
    masks: dict[int, Optional[np.ndarray]]  # slice → H×W bool, or None
    route: RouteDecision
    timings_ms: dict[str, float]
    iou: Optional[float] = None
    undo_depth: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def mask(self) -> Optional[np.ndarray]:
        """The mask on the interaction's own slice."""
        return self.masks.get(self.slice)


@dataclass
class _Label:
    index: int  # 1..255 in the label volume
    slices: dict[int, SliceHistory] = field(default_factory=dict)

    def history(self, k: int) -> SliceHistory:
        return self.slices.setdefault(k, SliceHistory())


class _Clock:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {"embedding": 0.0, "decoder": 0.0}
        self.start = time.perf_counter()

    def add(self, stage: str, since: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - since) * 1e3

    def done(self) -> dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self.start) * 1e3
        return self.ms


class Session:
    """An image or volume held for prompting. Interactions are serialised per session;
    several sessions run side by side and share the ``EmbeddingCache``."""

    def __init__(self, session_id: str, source: SessionSource, pipe: VolumePredictor, cache: EmbeddingCache,
                 options: SessionOptions = SessionOptions(), executor: Optional[Executor] = None) -> None:
        if options.task is not None:
            pipe.check_task(options.task)
        self.id, self.source, self.pipe, self.cache = session_id, source, pipe, cache
        self.options, self.executor = options, executor
        self.labels: dict[str, _Label] = {}
        self.route: Optional[RouteDecision] = None
        self.lock = threading.RLock()
        self._route_lock = threading.Lock()
        self.closed = False

    # ----- embeddings and the route -----------------------------------------------------------
    def _raw(self, k: int) -> tuple[np.ndarray, Any]:
        x, frame = preprocess(self.source.image(k), self.pipe.preprocessing)
        with self.cache.encode_lock:
            return self.pipe.encode(x), frame

    def _decide(self, k: int) -> RouteDecision:
        """Encode slice k (and its voting neighbours), score them, fix the route; the aligned
        embeddings of the slices encoded on the way go into the cache."""
        names = list(self.pipe.task_names)
        thresholds = {n: float(t) for n, t in zip(names, self.pipe.thresholds)}
        n = 0 if not self.source.is_volume else max(0, self.options.route_neighbours)
        voters = [j for j in range(k - n, k + n + 1) if 0 <= j < self.source.depth]
        raws = {j: self._raw(j) for j in voters}
        scores = np.stack([self.pipe.route(raws[j][0])[1] for j in voters]) if names else np.zeros((1, 0))
        mean = scores.mean(axis=0).astype(np.float32)
        if self.options.task is not None:
            route, mode = self.pipe.check_task(self.options.task), "forced"
        else:
            route, mode = self.pipe.choose(mean), ("volume" if self.source.is_volume else "image")
        decision = RouteDecision(route, mode, {m: float(s) for m, s in zip(names, mean)}, thresholds, tuple(voters))
        for j, (raw, frame) in raws.items():
            aligned = np.ascontiguousarray(self.pipe.align(raw, route), dtype=np.float32)
            self.cache.get((self.id, j), lambda a=aligned, f=frame: SliceEmbedding(a, f))
        return decision

    def decision(self, k: int) -> RouteDecision:
        """The session's route, decided at the first call (from slice k's neighbourhood)."""
        with self._route_lock:
            if self.route is None:
                self.route = self._decide(k)
            return self.route

    def embedding(self, k: int) -> SliceEmbedding:
        """Slice k's aligned embedding: from the cache, or encoded and aligned once."""
        route = self.decision(k).route

        def compute() -> SliceEmbedding:
            raw, frame = self._raw(k)
            return SliceEmbedding(np.ascontiguousarray(self.pipe.align(raw, route), dtype=np.float32), frame)

        return self.cache.get((self.id, k), compute)

    def prefetch(self, k: int) -> None:
        """Encode the slices next to k in the background (volumes only), nearest first."""
        if self.executor is None or not self.source.is_volume or self.options.prefetch <= 0:
            return
        for d in range(1, self.options.prefetch + 1):
            for j in (k + d, k - d):
                if 0 <= j < self.source.depth and (self.id, j) not in self.cache:
                    self.executor.submit(self._background, j)

    def _background(self, k: int) -> None:
        if not self.closed:
            try:
                self.embedding(k)
            except Exception:  # noqa: BLE001 - a prefetch that fails is retried by the prompt that needs it
                pass

    # ----- labels -----------------------------------------------------------------------------
    def label(self, name: str, create: bool = True) -> _Label:
        check_label_name(name)
        if name not in self.labels:
            if not create:
                raise InputError(f"label {name!r} has no prompts in this session")
            if len(self.labels) >= MAX_LABELS:
                raise InputError(f"a session holds at most {MAX_LABELS} labels")
            self.labels[name] = _Label(index=max((lb.index for lb in self.labels.values()), default=0) + 1)
        return self.labels[name]

    # ----- interactions -------------------------------------------------------------------------
    def _run(self, k: int, step_prompts: tuple, previous: Optional[Step], clock: _Clock,
             source: str = "prompt") -> tuple[Step, float, list[str]]:
        """Decode slice k with a box and/or clicks (and the previous logits) → (step, IoU, warnings)."""
        box, points, point_labels = step_prompts
        t0 = time.perf_counter()
        emb = self.embedding(k)
        clock.add("embedding", t0)
        mask_input = previous.mask_input if (previous is not None and self.pipe.capabilities.mask_input) else None
        prompts = Prompts.for_image(
            self.source.slice_hw, boxes=None if box is None else np.asarray([box], np.float32),
            points=np.asarray([points], np.float32) if points else None,
            labels=np.asarray([point_labels], np.float32) if points else None, mask_input=mask_input)
        t1 = time.perf_counter()
        masks, low, iou = self.pipe.decode(emb.aligned, emb.frame, prompts, route=IDENTITY)
        clock.add("decoder", t1)
        box_kept = None if prompts.boxes is None else tuple(float(v) for v in prompts.boxes[0])
        keep = low[0:1] if self.pipe.capabilities.mask_input else None  # logits only for a decoder that reads them
        step = Step.make(box_kept, points, point_labels, masks[0], keep, source)
        return step, float(iou[0]), list(prompts.warnings)

    def _reply(self, name: str, k: int, clock: _Clock, iou: Optional[float] = None,
               warnings: Optional[list[str]] = None, slices: Optional[list[int]] = None) -> Interaction:
        label = self.labels[name]
        masks = {j: (None if label.history(j).current is None else label.history(j).current.mask)
                 for j in (slices if slices is not None else [k])}
        assert self.route is not None
        return Interaction(name, k, masks, self.route, clock.done(), iou, len(label.history(k).steps), warnings or [])

    def box(self, name: str, box: Any, k: Optional[int] = None) -> Interaction:
        """A new box on slice k for label ``name``: starts the slice's prompts afresh."""
        k = self.source.check_slice(k)
        with self.lock:
            label, clock = self.label(name), _Clock()
            step, iou, warnings = self._run(k, (tuple(float(v) for v in np.asarray(box, float).reshape(-1)), (), ()),
                                            None, clock)
            label.history(k).push(step)
            self.prefetch(k)
            return self._reply(name, k, clock, iou, warnings)

    def click(self, name: str, x: float, y: float, positive: bool = True, k: Optional[int] = None) -> Interaction:
        """A click on slice k: the current box, all clicks so far plus this one, and the
        previous logits refine the mask (a first click without a box segments from the point)."""
        k = self.source.check_slice(k)
        with self.lock:
            label, clock = self.label(name), _Clock()
            previous = label.history(k).current
            points = (previous.points if previous else ()) + ((float(x), float(y)),)
            signs = (previous.point_labels if previous else ()) + (1 if positive else 0,)
            step, iou, warnings = self._run(k, (previous.box if previous else None, points, signs), previous,
                                            clock, "click")
            label.history(k).push(step)
            self.prefetch(k)
            return self._reply(name, k, clock, iou, warnings)

    def undo(self, name: str, k: Optional[int] = None) -> Interaction:
        """Take back label ``name``'s last step on slice k."""
        k = self.source.check_slice(k)
        with self.lock:
            self.label(name, create=False).history(k).undo()
            self.decision(k)
            return self._reply(name, k, _Clock())

    def reset(self, name: Optional[str] = None) -> None:
        """Forget one label's prompts and masks, or every label's; the cached embeddings and
        the route stay (they depend on the image only)."""
        with self.lock:
            if name is None:
                self.labels.clear()
            else:
                self.label(name, create=False)  # an unknown label is an error, not a no-op
                del self.labels[name]

    def propagate(self, name: str, k: Optional[int] = None,
                  progress: Optional[Callable[[int], None]] = None,
                  limits: Optional[tuple[int, int]] = None) -> Interaction:
        """From label ``name``'s mask on slice k outward, each next slice prompted with the
        previous mask's box, until the mask falls under the minimum area (casam-infer's rule)
        or the walk leaves ``limits`` (first, last slice; a 3-D box's range, as --box3d).
        ``progress`` is called with each slice as it is done."""
        k = self.source.check_slice(k)
        if not self.source.is_volume:
            raise InputError("propagate needs a volume; this session holds a 2-D image")
        with self.lock:
            label, clock = self.label(name, create=False), _Clock()
            start = label.history(k).current
            if start is None:
                raise InputError(f"label {name!r} has no mask on slice {k} to propagate from")
            done = [k]
            for step in (1, -1):
                done += self._walk(label, (k, step, start.mask), clock, progress, limits)
            return self._reply(name, k, clock, slices=sorted(done))

    def _walk(self, label: _Label, start: tuple[int, int, np.ndarray], clock: _Clock,
              progress: Optional[Callable[[int], None]], limits: Optional[tuple[int, int]] = None) -> list[int]:
        k, step, mask = start
        rule, done = self.options.propagation, []
        first, last = (0, self.source.depth - 1) if limits is None else limits
        j = k + step
        while max(0, first) <= j <= min(self.source.depth - 1, last):
            box = next_box(mask, rule.margin, rule.min_area)
            if box is None:
                break
            result, _, _ = self._run(j, (tuple(float(v) for v in box), (), ()), None, clock, "propagated")
            mask = result.mask
            if int(mask.sum()) < rule.min_area:  # noise at the object's tip ends the walk, unwritten
                break
            label.history(j).push(result)
            done.append(j)
            if progress is not None:
                progress(j)
            j += step
        return done

    # ----- results ----------------------------------------------------------------------------
    def label_map(self) -> np.ndarray:
        """Every label's current masks as one uint8 array of the source's shape (0 background,
        the label's index elsewhere; lower indices win where labels overlap, as in casam-infer)."""
        with self.lock:
            out = np.zeros(self.source.shape, dtype=np.uint8)
            view = out[None] if self.source.axis is None else np.moveaxis(out, self.source.axis, 0)
            for label in sorted(self.labels.values(), key=lambda lb: lb.index):
                for k, history in label.slices.items():
                    if history.current is not None:
                        plane = view[k]
                        plane[history.current.mask & (plane == 0)] = label.index
            return out

    def label_names(self) -> dict[int, str]:
        """Label index → name, for a SEG's segment descriptions."""
        return {lb.index: name for name, lb in self.labels.items()}

    def describe(self) -> dict[str, Any]:
        """What a client needs to draw the session: shape, slices, labels, route."""
        with self.lock:
            return {"session_id": self.id, "shape": list(self.source.shape), "axis": self.source.axis,
                    "slices": self.source.depth, "volume": self.source.is_volume,
                    "labels": {n: {"index": lb.index, "slices": sorted(k for k, h in lb.slices.items() if h.current)}
                               for n, lb in self.labels.items()},
                    "route": None if self.route is None else self.route.to_dict(), "warnings": self.source.warnings}

    def close(self) -> None:
        """Free the session's cached embeddings and its source's files; later background
        encodes are skipped."""
        self.closed = True
        self.cache.drop(self.id)
        with self.lock:  # an interaction still reading the source's voxels finishes first
            self.source.release()
