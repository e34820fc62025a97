"""One input of a casam-infer run as a job: an ``ImageJob`` (a picture, or one slice of a
volume with --single-slice), a ``VolumeJob`` (NIfTI, DICOM series, multi-frame DICOM) or a
``FailedJob`` (an input that could not be read or prompted).

Each job knows its own steps, which the run loop (casam_infer/cli.py) calls in this order:

- ``prepare_job`` reads and prompts the input, on the main thread in input order;
- ``predict(ctx)`` is the concurrent part (an image's one request; up to --concurrency in
  flight); a volume is many requests and does its work in ``finish`` instead, in order;
- ``finish(ctx, predicted)`` scores it against its ground truth and writes its outputs, in
  input order, through the run's ``OutputDir``: a stem no other output has, and all of the
  input's files or none of them;
- ``describe(record, timings)`` is its summary line.

``prompts()`` is the one place each job turns its ``ImagePrompts`` into what the predictor
takes, and ``predict``/``segment`` the one call that passes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from casam_core.errors import CasamError, InputError, ManifestError
from casam_core.files import atomic_write_json
from casam_core.ownership import OutputDir
from casam_infer.inputs import RunEnding, base_stem, prompts_for
from casam_infer.options import InferOptions
from casam_infer.outputs import write_outputs
from casam_infer.volume_outputs import write_volume_outputs
from casam_io.image_io import Scan, read_scan
from casam_io.writers.rtstruct import rtstruct_refusal, write_rtstruct
from casam_io.writers.seg import seg_identity
from runtime.predictor import Predictor, volume_predictor
from runtime.prompt_sources import ImagePrompts, group_prompts
from runtime.prompts import Prompts
from runtime.scoring import DeploymentScores
from runtime.volume import Propagation, VolumeResult, segment_volume

EVALUATION_FILE = "evaluation.json"  # the run's summary: a reserved name no input's outputs may take


@dataclass
class RunContext:
    """What every job of one run shares: the options, the opened predictor, the output
    folder and the scores."""

    pipe: Predictor
    opts: InferOptions
    out: OutputDir
    table: Optional[dict[str, ImagePrompts]]
    scores: DeploymentScores
    backend_info: dict[str, Any]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))  # --box-jitter: seeded
    #: --dicomweb --store: (input, staging folder, record) → where its SEG was stored (casam_infer/dicomweb.py)
    store: Optional[Callable[[Path, Path, dict[str, Any]], dict[str, Any]]] = None


def prepare_job(ctx: RunContext, path: Path) -> "Job":
    """Read and prompt one input (--box-jitter draws stay in input order). An input that
    cannot be read or prompted becomes a FailedJob, reported in its place; a broken export
    (ManifestError) ends the run at once."""
    vol = ctx.opts.volumes
    try:
        scan = read_scan(path, volume=vol.volume, max_pixels=vol.max_pixels, allow_gaps=vol.allow_gaps,
                         strict_4d=not vol.single_slice)
        given = prompts_for(path, scan, ctx.table, ctx.opts.prompts, vol, ctx.rng)
        if scan.is_volume and not vol.single_slice:
            return VolumeJob(path, scan, given)
        return ImageJob.prepare(ctx, path, scan, given)
    except ManifestError:
        raise
    except CasamError as exc:
        return FailedJob(path, exc)


@dataclass
class FailedJob:
    """An input that failed before its request; its error is reported at its turn (a
    RunEnding one ends the run there, as a sequential run would)."""

    path: Path
    error: CasamError

    def predict(self, ctx: RunContext) -> None:
        raise self.error

    def finish(self, ctx: RunContext, predicted: Any) -> dict[str, Any]:  # pragma: no cover - predict raised
        raise self.error

    def describe(self, record: dict[str, Any], timings: bool) -> str:  # pragma: no cover - never written
        return f"{self.path.name}: failed"


@dataclass
class ImageJob:
    """A 2-D image (or one slice of a volume), prepared for the engines."""

    path: Path
    image: np.ndarray
    given: ImagePrompts
    read_warnings: list[str]
    checked: Optional[Prompts] = None  # the prompts, checked against the prepared image

    @classmethod
    def prepare(cls, ctx: RunContext, path: Path, scan: Scan, given: ImagePrompts) -> "ImageJob":
        vol = ctx.opts.volumes
        if given.box3d:
            raise InputError(f"--box3d is for volumes; {path.name} is a 2-D image: give --box or --point")
        job = cls(path, np.empty(0), given, [])
        job.listed()  # a prompt error is this image's own, found before its pixels are windowed
        job.image, job.read_warnings = ctx.pipe.preprocessing.prepare(scan, vol.slice, vol.axis)
        job.checked = given.for_image(job.image.shape)
        return job

    def listed(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        """(K×4 boxes, K×P×2 points, K×P labels) as given, for the record."""
        return group_prompts(self.given.boxes, self.given.points, self.given.point_labels)

    def predict(self, ctx: RunContext) -> Any:
        """The request itself (run on the concurrency pool)."""
        assert self.checked is not None  # set by prepare
        return ctx.pipe.predict(self.image, self.checked, task=ctx.opts.general.task)

    def finish(self, ctx: RunContext, result: Any) -> dict[str, Any]:
        """Score against the ground truth (if any) and write; a write that fails ends the run."""
        result.warnings[:0] = self.read_warnings
        evaluation = ctx.scores.add_image(self.path.name, result.route, result.masks, self.given.truth,
                                          self.given.truth_values)
        try:
            return self.write(ctx, result, {"backend": ctx.backend_info, "evaluation": evaluation})
        except RunEnding:
            raise
        except CasamError as exc:
            raise RunEnding(str(exc)) from exc

    def write(self, ctx: RunContext, result: Any, fields: dict[str, Any]) -> dict[str, Any]:
        """The masks, the overlay and the JSON record, appearing together under a free stem."""
        overlay = ctx.opts.outputs.overlay
        suffixes = [".json", *(f"_mask{k}.png" for k in range(len(result.masks)))] + (["_overlay.png"] if overlay else [])
        stem = ctx.out.allocate(base_stem(self.path), suffixes)
        with ctx.out.group() as staging:
            return write_outputs(staging, stem, str(self.path), self.image, result, self.listed(), overlay, fields)

    def describe(self, record: dict[str, Any], timings: bool) -> str:
        thresholds = record["thresholds"]
        scores = ", ".join(f"{t} {s:.4g}{' ≤' if s <= thresholds[t] else ' >'} τ {thresholds[t]:.4g}"
                           for t, s in record["scores"].items())
        ious = ", ".join(f"{p['iou']:.3f}" for p in record["prompts"])
        line = (f"{self.path.name}: route {record['route']} ({scores or 'no tasks'}); "
                f"{len(record['prompts'])} mask(s), predicted IoU {ious}")
        if timings:
            line += "\n  ms: " + ", ".join(f"{k} {v:.1f}" for k, v in record["timings_ms"].items())
        return line


@dataclass
class VolumeJob:
    """A volume: propagated slice by slice, routed as one, written as a label volume."""

    path: Path
    scan: Scan
    given: ImagePrompts

    def prompts(self, ctx: RunContext) -> Prompts:
        """Labels 1..K: the boxes on their slice, then the 3-D boxes, checked against the volume."""
        vol = ctx.opts.volumes
        return self.given.for_volume(self.scan.data.shape, vol.axis, vol.slice)

    def predict(self, ctx: RunContext) -> None:
        """Nothing on the pool: a volume is many requests, run in order by ``finish``."""
        return None

    def finish(self, ctx: RunContext, predicted: None) -> dict[str, Any]:
        """Propagate, route the volume, score it and write it; any error is this volume's."""
        local = volume_predictor(ctx.pipe, "volumes")
        vol = ctx.opts.volumes
        result = segment_volume(local, self.scan, self.prompts(ctx), ctx.opts.general.task,
                                Propagation(vol.per_slice, vol.batch, vol.margin, vol.min_area))
        evaluation = ctx.scores.add_volume(self.path.name, result.route, [r.route for r in result.slices.values()],
                                           result.labels, self.given.truth, self.given.truth_values, vol.axis)
        return self.write(ctx, result, {"backend": ctx.backend_info, "evaluation": evaluation})

    def write(self, ctx: RunContext, result: VolumeResult, fields: dict[str, Any]) -> dict[str, Any]:
        """The NIfTI mask, the SEG (DICOM input), the montage and the record, together."""
        overlay, axis = ctx.opts.outputs.overlay, ctx.opts.volumes.axis
        rtstruct = ctx.opts.outputs.rtstruct and bool(self.scan.datasets)
        suffixes = [".json", "_mask.nii.gz"] + (["_seg.dcm"] if self.scan.datasets else []) + (
            ["_overlay.png"] if overlay else []) + (["_rtstruct.dcm"] if rtstruct else [])
        stem = ctx.out.allocate(base_stem(self.path), suffixes)
        with ctx.out.group() as staging:
            record = write_volume_outputs(staging, stem, self.scan, result, axis, overlay,
                                          ctx.pipe.preprocessing.slices(self.scan, axis), fields)
            if rtstruct:
                self.write_rtstruct(staging, stem, result, record)
            if ctx.store is not None:  # stored before the local outputs appear: a refusal leaves neither
                record["stored"] = ctx.store(self.path, staging, record)
            if rtstruct or ctx.store is not None:
                atomic_write_json(staging / f"{stem}.json", record)
            return record

    def write_rtstruct(self, staging: Path, stem: str, result: VolumeResult, record: dict[str, Any]) -> None:
        """--rtstruct: the labels' contours as an RT Structure Set, or a warning saying why not."""
        refusal = rtstruct_refusal(self.scan)
        record["outputs"]["rtstruct"] = None
        if refusal is not None:
            record["warnings"].append(refusal)
        elif write_rtstruct(staging / f"{stem}_rtstruct.dcm", self.scan, result.labels,
                            {v: f"label {v}" for v in range(1, 256)}, seg_identity(result.route)[0]):
            record["outputs"]["rtstruct"] = f"{stem}_rtstruct.dcm"

    def describe(self, record: dict[str, Any], timings: bool) -> str:
        spans = ", ".join(f"label {s['label']} slices {s['slices'][0]}-{s['slices'][1]} ({s['voxels']} voxels)"
                          for s in record["structures"]) or "nothing segmented"
        return (f"{self.path.name}: volume {'×'.join(map(str, record['shape']))}, route {record['route']} "
                f"({record['route_mode']}); {spans}; {record['outputs']['mask']}")


Job = Union[ImageJob, VolumeJob, FailedJob]
