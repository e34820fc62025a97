"""Volume inference: box prompts on one slice, propagated through a NIfTI or DICOM volume,
with one route for the whole volume.

Propagation: slice K is segmented with the user's box; going outward in both directions,
each next slice is prompted with the bounding box of the previous slice's mask (enlarged
by ``margin`` pixels) until the mask falls below ``min_area`` pixels. A 3-D box starts on
the middle slice of its range with its own extent and propagates the same way, but
segments every slice of the range (the usual 3-D box inference of MedSAM-style tools): a
slice whose neighbour's mask vanished is prompted with the box's extent again.

Volume routing: the router scores every processed slice and the volume takes one route,
the argmin of the mean score over those slices, checked against that task's threshold, so
a tumour's slices cannot flip between tasks. The route needs the slices and the slices need
the route, so propagation first runs with each slice's own route; when any differs from
the volume route the volume is propagated again with it, from the embeddings kept.

Memory stays flat in the number of slices: slices are windowed one at a time (with the
volume's window, found once, from the predictor's recorded intensity), and embeddings past
the first 256 MB go to a temporary file as they are computed.

Prompts arrive as one ``runtime.prompts.Prompts`` made with ``Prompts.for_volume``, already
checked against the volume; ``volume_prompts`` lists its structures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from casam_core.errors import InputError
from casam_io.scan import Scan
from casam_core.names import IDENTITY
from runtime.predictor import DEFAULT_BATCH, VolumePredictor
from runtime.preprocess import Frame, preprocess
from runtime.prompts import Prompts

DEFAULT_MIN_AREA = 16  # pixels: below this a propagated mask is noise, not the object
DEFAULT_MARGIN = 2.0  # pixels added around the previous mask's bounding box
__all__ = ["DEFAULT_BATCH", "Propagation", "next_box", "VolumePrompt", "VolumeSegmenter", "segment_volume", "volume_prompts"]


@dataclass(frozen=True)
class Propagation:
    """How a volume is walked: routing per slice or per volume, slices per encoder call
    (None: the predictor's ``capabilities.encoder_batch``), the margin around the previous
    mask's box, and the smallest mask that keeps the walk going."""

    per_slice: bool = False
    batch: Optional[int] = None
    margin: float = DEFAULT_MARGIN
    min_area: int = DEFAULT_MIN_AREA


RESIDENT_BYTES = 256 << 20  # embeddings kept in memory before the rest spill to disk


def next_box(mask: np.ndarray, margin: float = DEFAULT_MARGIN, min_area: int = DEFAULT_MIN_AREA) -> Optional[np.ndarray]:
    """The propagation rule: the next slice's box is this slice's mask's bounding box enlarged
    by ``margin`` pixels, or None (the walk ends) when the mask is under ``min_area`` pixels.
    casam-infer's volume mode and interactive sessions' "propagate" both walk by it."""
    if int(mask.sum()) < min_area:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return np.array([max(cols[0] - margin, 0.0), max(rows[0] - margin, 0.0),
                     min(cols[-1] + 1 + margin, float(w)), min(rows[-1] + 1 + margin, float(h))], dtype=np.float32)


@dataclass(frozen=True)
class VolumePrompt:
    """One structure to segment: label 1..K, a box in slice pixels (x0 y0 x1 y1), the slice
    it is drawn on, and, for a 3-D box, the inclusive slice range it covers."""

    label: int
    box: tuple[float, float, float, float]
    start: int
    limits: Optional[tuple[int, int]] = None


def volume_prompts(prompts: Prompts) -> list[VolumePrompt]:
    """A volume's checked prompts → its structures, labels 1..K: the boxes on ``slice``, then
    the 3-D boxes (each started on the middle slice of its range)."""
    if not prompts.is_volume or prompts.slice is None:
        raise InputError("volume propagation needs Prompts.for_volume")
    out = [VolumePrompt(k, (float(b[0]), float(b[1]), float(b[2]), float(b[3])), prompts.slice)
           for k, b in enumerate([] if prompts.boxes is None else prompts.boxes, start=1)]
    for x0, y0, z0, x1, y1, z1 in [] if prompts.box3d is None else prompts.box3d:
        out.append(VolumePrompt(len(out) + 1, (float(x0), float(y0), float(x1), float(y1)),
                                (int(z0) + int(z1)) // 2, (int(z0), int(z1))))
    return out


@dataclass
class SliceRecord:
    index: int
    scores: list[float]
    route: str = IDENTITY
    prompts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class VolumeResult:
    labels: np.ndarray  # uint8, the volume's shape; 0 background, 1..K
    route: str  # the volume's route ("per-slice" with per-slice routing)
    route_mode: str  # "volume", "per-slice" or "forced"
    mean_scores: dict[str, float]
    thresholds: dict[str, float]
    slices: dict[int, SliceRecord]
    passes: int
    warnings: list[str]
    timings_ms: dict[str, float]


class EmbeddingSpill:
    """Slice embeddings by slice index: encoded once, read back when needed, never all in
    memory. The first ``resident_bytes`` stay in memory (a 64-slice volume's 4 MB
    embeddings, so a typical volume never touches the disk: writing each to a file cost
    time per slice, ad hoc); the rest go to a temporary file, so memory stays flat however many
    slices a volume has."""

    def __init__(self, resident_bytes: int = RESIDENT_BYTES) -> None:
        self.resident_bytes = int(resident_bytes)
        self._memory: dict[int, np.ndarray] = {}
        self._held = 0
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._file: Optional[Any] = None
        self._where: dict[int, tuple[int, tuple[int, ...]]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._memory or index in self._where

    def put(self, index: int, embedding: np.ndarray) -> None:
        data = np.array(embedding, dtype=np.float32, order="C")  # a copy: the batch it came from is freed
        if self._held + data.nbytes <= self.resident_bytes:
            self._memory[index] = data
            self._held += data.nbytes
            return
        if self._file is None:
            self._dir = tempfile.TemporaryDirectory(prefix="casam-volume-")
            self._file = open(Path(self._dir.name) / "embeddings.bin", "w+b")  # noqa: SIM115 - closed in close()
        self._file.seek(0, 2)
        self._where[index] = (self._file.tell(), data.shape)
        self._file.write(data.tobytes())

    def get(self, index: int) -> np.ndarray:
        if index in self._memory:
            return self._memory[index]
        assert self._file is not None
        offset, shape = self._where[index]
        self._file.seek(offset)
        count = int(np.prod(shape))
        return np.frombuffer(self._file.read(count * 4), dtype=np.float32).reshape(shape)

    @property
    def on_disk(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._memory.clear()
        if self._file is not None:
            self._file.close()
        if self._dir is not None:
            self._dir.cleanup()


class VolumeSegmenter:
    """Runs one volume through a ``VolumePredictor`` (``encode``, ``route``, ``decode``,
    ``choose``); slices are prepared with the predictor's recorded intensity."""

    def __init__(self, pipe: VolumePredictor, scan: Scan, axis: int = 2, settings: Propagation = Propagation()) -> None:
        if scan.data.ndim != 3:
            raise InputError(f"{scan.path} is not a volume (shape {scan.data.shape})")
        if not 0 <= axis < 3:
            raise InputError(f"--axis {axis} does not exist in a 3-D volume (0, 1 or 2)")
        self.pipe, self.scan, self.axis = pipe, scan, axis
        self.batch = pipe.capabilities.encoder_batch if settings.batch is None else max(1, int(settings.batch))
        self.margin, self.min_area = float(settings.margin), int(settings.min_area)
        self.slices = pipe.preprocessing.slices(scan, axis)
        self.warnings = list(self.slices.warnings)
        self.count = scan.data.shape[axis]
        self.slice_hw = tuple(s for i, s in enumerate(scan.data.shape) if i != axis)
        self.scores: dict[int, np.ndarray] = {}
        self.spill = EmbeddingSpill()
        self.frame: Optional[Frame] = None
        self.ms = {"preprocess": 0.0, "encoder": 0.0, "router": 0.0, "decoder": 0.0}
        self.encoded = 0

    # ----- slices and embeddings --------------------------------------------------------
    def slice_image(self, k: int) -> np.ndarray:
        """Slice k as 8-bit, with the volume's window (identical to windowing the volume)."""
        return self.slices(k)

    def _encode(self, indices: list[int]) -> None:
        t0 = time.perf_counter()
        inputs = []
        for k in indices:
            x, self.frame = preprocess(self.slice_image(k), self.pipe.preprocessing)
            inputs.append(x)
        t1 = time.perf_counter()
        embeddings = self.pipe.encode(np.concatenate(inputs))
        t2 = time.perf_counter()
        for i, k in enumerate(indices):
            one = embeddings[i:i + 1]
            self.scores[k] = np.asarray(self.pipe.route(one)[1], dtype=np.float64)
            self.spill.put(k, one)
        t3 = time.perf_counter()
        self.ms["preprocess"] += (t1 - t0) * 1e3
        self.ms["encoder"] += (t2 - t1) * 1e3
        self.ms["router"] += (t3 - t2) * 1e3
        self.encoded += len(indices)

    def embedding(self, k: int, step: int = 1, stop: Optional[int] = None) -> np.ndarray:
        """Slice k's embedding; a miss encodes a batch of the next slices in direction
        ``step`` (up to ``stop``, exclusive), which propagation is about to ask for."""
        if k not in self.spill:
            end = (self.count if step > 0 else -1) if stop is None else stop
            ahead = [j for j in range(k, end, step) if j not in self.spill][: self.batch]
            self._encode(ahead or [k])
        return self.spill.get(k)

    def prefetch(self, indices: list[int]) -> None:
        todo = [k for k in indices if k not in self.spill]
        for start in range(0, len(todo), self.batch):
            self._encode(todo[start:start + self.batch])

    # ----- one slice ----------------------------------------------------------------------
    def _decode(self, k: int, box: np.ndarray, route: str) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        assert self.frame is not None
        prompts = Prompts.for_image(self.frame.original_hw, boxes=box[None])
        masks, _, iou = self.pipe.decode(self.spill.get(k), self.frame, prompts, route=route)
        self.ms["decoder"] += (time.perf_counter() - t0) * 1e3
        return masks[0], float(iou[0])

    def _next_box(self, mask: np.ndarray) -> Optional[np.ndarray]:
        return next_box(mask, self.margin, self.min_area)

    # ----- propagation ----------------------------------------------------------------------
    def propagate(self, prompt: VolumePrompt, route_for: Callable[[int], str], labels: np.ndarray,
                  records: dict[int, SliceRecord]) -> None:
        """Segment one structure into ``labels`` (lower labels win where structures overlap).

        From the prompt's slice outward, each slice is prompted with the previous slice's
        mask box. Without limits the walk ends where the mask falls under ``min_area``; a
        3-D box instead segments every slice of its range, and a slice whose neighbour's
        mask vanished is prompted with the 3-D box's own extent again.
        """
        box = np.asarray(prompt.box, dtype=np.float32)
        bounded = prompt.limits is not None
        lo, hi = prompt.limits if prompt.limits is not None else (0, self.count - 1)
        self.embedding(prompt.start, 1, hi + 1)
        mask = self._segment(prompt.start, box, prompt.label, route_for, labels, records, keep_small=bounded)
        for step in (1, -1):
            current, k = mask, prompt.start + step
            while lo <= k <= hi:
                next_box = self._next_box(current)
                if next_box is None:
                    if not bounded:
                        break
                    next_box = box
                self.embedding(k, step, hi + 1 if step > 0 else lo - 1)
                current = self._segment(k, next_box, prompt.label, route_for, labels, records, keep_small=bounded)
                k += step

    def _segment(self, k: int, box: np.ndarray, label: int, route_for: Callable[[int], str], labels: np.ndarray,
                 records: dict[int, SliceRecord], keep_small: bool = False) -> np.ndarray:
        """Decode slice k into ``labels``. A propagated mask under ``min_area`` ends the walk
        and is left out (it is noise at the object's tip); a 3-D box keeps every mask."""
        self.embedding(k)
        route = route_for(k)
        mask, iou = self._decode(k, box, route)
        record = records.setdefault(k, SliceRecord(k, [float(s) for s in self.scores[k]]))
        record.route = route
        record.prompts.append({"label": label, "box": [float(v) for v in box], "area": int(mask.sum()), "iou": iou})
        if keep_small or int(mask.sum()) >= self.min_area:
            view = np.moveaxis(labels, self.axis, 0)[k]
            view[mask & (view == 0)] = label
        return mask

    def run_pass(self, prompts: list[VolumePrompt], route_for: Callable[[int], str]) -> tuple[np.ndarray, dict[int, SliceRecord]]:
        # Each slice contiguous in memory (the volume's shape is a view), so writing a slice's
        # mask is not a strided scatter over the whole volume.
        labels = np.moveaxis(np.zeros((self.count, *self.slice_hw), dtype=np.uint8), 0, self.axis)
        records: dict[int, SliceRecord] = {}
        for prompt in prompts:
            self.propagate(prompt, route_for, labels, records)
        return labels, records

    def close(self) -> None:
        self.spill.close()


def volume_route(pipe: VolumePredictor, scores: list[np.ndarray]) -> tuple[str, np.ndarray]:
    """(route, mean score per task) over the processed slices: the argmin of the mean, if it
    is within that task's threshold, else the identity."""
    if not scores or len(scores[0]) == 0:
        return IDENTITY, np.zeros(0)
    mean = np.mean(np.stack(scores), axis=0)
    return pipe.choose(mean.astype(np.float32)), mean


def segment_volume(pipe: VolumePredictor, scan: Scan, prompts: Prompts, task: Optional[str] = None,
                   settings: Propagation = Propagation()) -> VolumeResult:
    """Segment ``prompts`` (``Prompts.for_volume`` of ``scan``; labels 1..K) through ``scan``
    and route the volume (see module doc)."""
    structures = volume_prompts(prompts)
    if tuple(scan.data.shape) != prompts.shape:
        raise InputError(f"prompts were checked against a volume of shape {prompts.shape}, not {scan.path}'s "
                         f"{tuple(scan.data.shape)}")
    forced = pipe.check_task(task) if task is not None else None
    started = time.perf_counter()
    seg = VolumeSegmenter(pipe, scan, int(prompts.axis or 0), settings)
    try:
        names = list(pipe.task_names)
        if forced is not None:
            labels, records = seg.run_pass(structures, lambda k: forced)
            route, mode, passes = forced, "forced", 1
            _, mean = volume_route(pipe, [seg.scores[k] for k in sorted(records)])
        else:
            labels, records = seg.run_pass(structures, lambda k: pipe.choose(seg.scores[k].astype(np.float32)))
            route, mean = volume_route(pipe, [seg.scores[k] for k in sorted(records)])
            mode, passes = "volume", 1
            if settings.per_slice:
                route, mode = "per-slice", "per-slice"
            elif any(r.route != route for r in records.values()):
                labels, records = seg.run_pass(structures, lambda k: route)
                passes = 2
        thresholds = {n: float(t) for n, t in zip(names, pipe.thresholds)}
        seg.ms["total"] = (time.perf_counter() - started) * 1e3
        seg.ms["slices_encoded"] = float(seg.encoded)
        return VolumeResult(labels, route, mode, {n: float(m) for n, m in zip(names, mean)}, thresholds,
                            dict(sorted(records.items())), passes, seg.warnings, seg.ms)
    finally:
        seg.close()
