"""casam-infer: segment images with exported CA-SAM engines, routed per image.

Bad input (a missing or corrupt image, an unusable box, a broken export folder, an
unknown task) ends the run with exit code 2 and one line on stderr, never a traceback:
at the edge, the person reading the error is rarely the one who can read Python.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import click
import numpy as np

from runtime.backends import BACKENDS, backends_help
from casam_core.errors import CasamError, InputError, ManifestError
from casam_io.image_io import DEFAULT_MAX_PIXELS, DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, Scan, prepared_slice, read_scan
from casam_io.intensity import Intensity
from casam_core.files import atomic_write_json, check_out_dir
from runtime.remote import DEFAULT_READY_TIMEOUT_S
from casam_infer.outputs import write_outputs
from runtime.prompt_sources import ImagePrompts, boxes_from_masks, has_mask, read_prompt_file
from runtime.scoring import DeploymentScores
from runtime.volume import DEFAULT_BATCH, DEFAULT_MARGIN, DEFAULT_MIN_AREA, VolumePrompt

DEFAULT_ENGINES = "casam_engines"
INPUT_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


def open_pipeline(engines: Path, backend: str = "auto", server: Optional[str] = None, max_resident: int = 8,
                  server_timeout: Optional[float] = None) -> Any:
    """The one place the CLI creates its predictor: local engines, or a casam server.

    Anything with ``predict(image, boxes=, points=, point_labels=, task=)`` returning a
    ``Result`` works below, so a remote backend plugs in here without touching the rest.
    """
    if server is not None:
        from runtime.remote import RemotePipeline

        return RemotePipeline(server, **({} if server_timeout is None else {"ready_timeout_s": server_timeout}))
    from runtime.pipeline import Pipeline

    return Pipeline.from_manifest(engines, backend=backend, max_resident=max_resident)


def resolve_engines(engines: Optional[Path]) -> Path:
    if engines is not None:
        return engines
    return Path(os.environ.get("CASAM_ENGINES") or DEFAULT_ENGINES)


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a DICOM series folder as one volume; other folders → their image
    files (not recursive), sorted by name."""
    from casam_io.volume_io import is_dicom_series

    files: list[Path] = []
    for path in paths:
        if path.is_dir() and is_dicom_series(path, IMAGE_SUFFIXES + NIFTI_SUFFIXES):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(INPUT_SUFFIXES))
            if not found:
                raise InputError(f"folder {path} holds no images ({', '.join(INPUT_SUFFIXES)})")
            files.extend(found)
        elif not path.exists():
            raise InputError(f"image {path} does not exist")
        else:
            files.append(path)
    return files


def group_prompts(
    box: Sequence[Sequence[float]], point: Sequence[Sequence[float]], label: Sequence[int]
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """CLI options → (K×4 boxes, K×P×2 points, K×P labels).

    Each box is one prompt. All points form one prompt (clicks on one object, negative ones
    excluding regions), combined with the box when exactly one box is given.
    """
    if not box and not point:
        raise InputError("give at least one prompt: --box X0 Y0 X1 Y1 or --point X Y")
    if label and len(label) != len(point):
        raise InputError(f"{len(label)} --label values for {len(point)} --point options: give none or one per point")
    if point and len(box) > 1:
        raise InputError("points refine a single object: combine --point with at most one --box")
    boxes = np.asarray(box, dtype=np.float32).reshape(-1, 4) if box else None
    points = np.asarray(point, dtype=np.float32)[None] if point else None
    labels = (np.asarray(label, dtype=np.float32) if label else np.ones(len(point), np.float32))[None] if point else None
    return boxes, points, labels


def unique_stem(path: Path, used: Counter) -> str:
    name = path.name
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    used[name] += 1
    return name if used[name] == 1 else f"{name}_{used[name] - 1}"


# ----- volumes (NIfTI, DICOM series and multi-frame files) ----------------------------------
@dataclass(frozen=True)
class VolumeOptions:
    """How volumes are read and segmented (casam-infer's volume options, grouped)."""

    slice: Optional[int] = None
    axis: int = 2
    volume: Optional[int] = None
    box3d: tuple[tuple[float, ...], ...] = ()
    per_slice: bool = False
    batch: Optional[int] = None  # by the backend's device (runtime.volume.DEFAULT_BATCH)
    margin: float = DEFAULT_MARGIN
    min_area: int = DEFAULT_MIN_AREA
    allow_gaps: bool = False
    single_slice: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS


def volume_prompts(boxes: Sequence[Sequence[float]], points: Sequence[Sequence[float]],
                   box3d: Sequence[Sequence[float]], start: Optional[int], scan: Scan, axis: int) -> list[VolumePrompt]:
    """Boxes on slice ``start`` (default: the middle slice) and 3-D boxes → labels 1..K in that order."""
    if points:
        raise InputError("--point is not supported for volumes; give --box with --slice, or --box3d")
    if not boxes and not box3d:
        raise InputError("give a prompt for the volume: --box X0 Y0 X1 Y1 with --slice K, or --box3d X0 Y0 Z0 X1 Y1 Z1")
    start = scan.data.shape[axis] // 2 if start is None else start
    prompts = [VolumePrompt(i, (b[0], b[1], b[2], b[3]), start) for i, b in enumerate(boxes, start=1)]
    for j, (x0, y0, z0, x1, y1, z1) in enumerate(box3d, start=len(prompts) + 1):
        if z1 < z0 or z0 != int(z0) or z1 != int(z1):
            raise InputError(f"--box3d #{j - len(boxes)}: give whole slice numbers Z0 ≤ Z1, got {z0:g} {z1:g}")
        prompts.append(VolumePrompt(j, (x0, y0, x1, y1), (int(z0) + int(z1)) // 2, (int(z0), int(z1))))
    return prompts


def run_volume(pipe: Any, path: Path, scan: Scan, stem: str, prompts: ImagePrompts, opts: VolumeOptions,
               intensity: Intensity, task: Optional[str], out: Path, overlay: bool, backend_info: dict[str, Any],
               scores: DeploymentScores) -> dict[str, Any]:
    """One volume: propagate, route the volume, write the NIfTI mask (+ SEG, montage, JSON)."""
    from runtime.volume import segment_volume
    from casam_infer.volume_outputs import write_volume_outputs

    if not hasattr(pipe, "encode"):
        raise InputError("volumes run on local engines only; drop --server for volume input")
    start = prompts.slice if prompts.slice is not None else opts.slice
    result = segment_volume(pipe, scan, volume_prompts(prompts.boxes, prompts.points, prompts.box3d, start, scan, opts.axis),
                            intensity, axis=opts.axis, task=task, per_slice=opts.per_slice, batch=opts.batch,
                            margin=opts.margin, min_area=opts.min_area)
    evaluation = scores.add_volume(path.name, result.route, [r.route for r in result.slices.values()], result.labels,
                                   prompts.truth, prompts.truth_values, opts.axis)
    return write_volume_outputs(out, stem, scan, result, opts.axis, overlay,
                                lambda k: prepared_slice(scan, intensity, k, opts.axis)[0], backend_info,
                                {"evaluation": evaluation})


# ----- prompts per image and scoring on ground truth ----------------------------------------
@dataclass(frozen=True)
class PromptOptions:
    """Where each image's prompts come from, and what it is scored against."""

    prompts_file: Optional[Path] = None
    boxes_from_masks: Optional[Path] = None
    box_jitter: float = 0.0
    expect_task: Optional[str] = None


def base_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def prompts_for(path: Path, scan: Scan, table: Optional[dict[str, ImagePrompts]], popts: PromptOptions,
                vol: VolumeOptions, rng: Any, box, point, label) -> ImagePrompts:
    """This image's prompts: its --prompts entry, else boxes from its mask, else the CLI's;
    with --boxes-from-masks its mask is the ground truth either way. (A --prompts file that
    lacks an image and has no mask folder behind it was refused by _check_inputs.)"""
    truth = None
    if popts.boxes_from_masks is not None:
        truth = boxes_from_masks(popts.boxes_from_masks, base_stem(path), scan.is_volume, vol.axis, popts.box_jitter, rng)
    entry = table.get(path.name) if table is not None else None
    if entry is None:
        entry = truth or ImagePrompts(boxes=list(box), points=list(point),
                                      point_labels=list(label) or [1] * len(point), slice=vol.slice, box3d=list(vol.box3d))
    if truth is not None:
        entry.truth, entry.truth_values = truth.truth, truth.truth_values
    return entry



def volume_line(name: str, record: dict[str, Any]) -> str:
    spans = ", ".join(f"label {s['label']} slices {s['slices'][0]}-{s['slices'][1]} ({s['voxels']} voxels)"
                      for s in record["structures"]) or "nothing segmented"
    return (f"{name}: volume {'×'.join(map(str, record['shape']))}, route {record['route']} ({record['route_mode']}); "
            f"{spans}; {record['outputs']['mask']}")
# ----- end volumes ---------------------------------------------------------------------------


def describe_line(name: str, record: dict[str, Any], timings: bool) -> str:
    scores = ", ".join(
        f"{t} {s:.4g}{' ≤' if s <= record['thresholds'][t] else ' >'} τ {record['thresholds'][t]:.4g}"
        for t, s in record["scores"].items()
    )
    ious = ", ".join(f"{p['iou']:.3f}" for p in record["prompts"])
    line = f"{name}: route {record['route']} ({scores or 'no tasks'}); {len(record['prompts'])} mask(s), predicted IoU {ious}"
    if timings:
        line += "\n  ms: " + ", ".join(f"{k} {v:.1f}" for k, v in record["timings_ms"].items())
    return line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--box", "box", nargs=4, type=float, multiple=True, metavar="X0 Y0 X1 Y1",
              help="A box prompt in original pixels; repeat for several objects (one mask each).")
@click.option("--point", "point", nargs=2, type=float, multiple=True, metavar="X Y",
              help="A click in original pixels. All points form one prompt (with at most one --box).")
@click.option("--label", "label", type=click.IntRange(0, 1), multiple=True,
              help="Label of each --point in order: 1 foreground (default), 0 background.")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="casam-export folder. Default: $CASAM_ENGINES, then ./casam_engines.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("casam_out"), show_default=True,
              help="Folder for <image>_mask<k>.png, <image>_overlay.png and <image>.json.")
@click.option("--overlay", is_flag=True, help="Also write the image with the masks and prompts drawn on it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print each image's JSON record on stdout (one line per image) instead of a summary line.")
@click.option("--task", default=None, metavar="NAME|identity",
              help="Force a task's alignment, or 'identity' for plain SAM. Default: route by the ELBO scores.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help=backends_help())
@click.option("--timings", is_flag=True, help="Print per-stage milliseconds for each image.")
@click.option("--max-resident", type=click.IntRange(min=1), default=8, show_default=True,
              help="Alignment engines kept loaded at once (least recently used ones are dropped).")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-image lines; errors still go to stderr.")
@click.option("--server", default=None, metavar="URL",
              help="Send each image to a casam-serve server (http://HOST:8000 or grpc://HOST:8001) "
                   "instead of running local engines; outputs are the same.")
# --- volumes and input limits (VolumeOptions) ---
@click.option("--slice", "slice", type=int, default=None, metavar="K",
              help="Volumes: the slice --box is drawn on (default: the middle slice along --axis).")
@click.option("--axis", type=click.IntRange(0, 2), default=2, show_default=True,
              help="Volumes: the slicing axis (2: the last, axial for the usual orientations).")
@click.option("--volume", "volume", type=click.IntRange(min=0), default=None, metavar="K",
              help="The volume of a 4-D NIfTI to segment (required for 4-D files in volume mode).")
@click.option("--box3d", "box3d", nargs=6, type=float, multiple=True, metavar="X0 Y0 Z0 X1 Y1 Z1",
              help="Volumes: a 3-D box; every slice Z0..Z1 (inclusive) is segmented, from the middle one "
                   "(prompted with the box) outward, each next slice prompted with the previous mask's box; "
                   "repeat for several labels (after those of --box).")
@click.option("--route-per-slice", "per_slice", is_flag=True,
              help="Volumes: route every slice on its own instead of one route for the volume.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Volumes: slices per encoder call [default: "
                   + ", ".join(f"{n} on {d.upper()}" for d, n in DEFAULT_BATCH.items())
                   + "; on the CPU, batches measured slower per slice].")
@click.option("--margin", type=click.FloatRange(min=0), default=DEFAULT_MARGIN, show_default=True,
              help="Volumes: pixels added around the previous slice's mask box when propagating.")
@click.option("--min-area", type=click.IntRange(min=1), default=DEFAULT_MIN_AREA, show_default=True,
              help="Volumes: propagation stops when a mask has fewer pixels than this.")
@click.option("--allow-gaps", is_flag=True, help="Accept a DICOM series with uneven slice positions (with a warning).")
@click.option("--single-slice", is_flag=True,
              help="Segment only slice --slice of a volume, as a 2-D image (PNG masks), without propagation.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels than this (decoding them could exhaust memory).")
# --- end volumes and input limits ---
# --- prompts per image and evaluation (PromptOptions) ---
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="JSON or CSV giving each file its own boxes, points and slice, keyed by file name "
                   "(see docs/MEDICAL.md).")
@click.option("--boxes-from-masks", type=click.Path(path_type=Path, file_okay=False), default=None, metavar="DIR",
              help="One box per structure from each image's mask (DIR/<stem>.png or .nii.gz); also reports "
                   "IoU and BIoU against those masks, per image, per route and overall.")
@click.option("--box-jitter", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="PX",
              help="Move each coordinate of a --boxes-from-masks box by up to ±PX pixels (seeded).")
@click.option("--expect-task", default=None, metavar="NAME|identity",
              help="The task every input should be routed to: reports the routing accuracy.")
# --- end prompts per image and evaluation ---
@click.option("--server-timeout", type=click.FloatRange(min=0), default=DEFAULT_READY_TIMEOUT_S, show_default=True,
              metavar="SECONDS", help="With --server: how long to wait for a starting server to load its models.")
# --- concurrent requests ---
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images in flight at once (with --server, lets the server batch its encoder runs). "
                   "Outputs are written in input order.")
@click.option("--fail-fast", is_flag=True,
              help="Stop at the first image that fails. Default: report it and go on; exit 2 if any failed.")
# --- end concurrent requests ---
def main(images: tuple[Path, ...], box, point, label, engines: Optional[Path], out: Path, overlay: bool,
         as_json: bool, task: Optional[str], backend: str, timings: bool,
         max_resident: int, quiet: bool, server: Optional[str], server_timeout: float, concurrency: int,
         fail_fast: bool, **options: Any) -> None:
    """Segment IMAGE(s) (files or folders) with CA-SAM: each image is routed to the task whose
    VAE explains it best, or to plain SAM (identity) when none does.

    A volume (NIfTI file, DICOM series folder, multi-frame DICOM) is segmented in 3-D: --box
    on --slice K is propagated outward slice by slice, the volume gets one route, and
    <stem>_mask.nii.gz (plus <stem>_seg.dcm for DICOM) is written. Intensities are windowed
    as the bundle was trained (manifest preprocessing.intensity).

    \b
    Examples:
      casam-infer scan.png --box 40 60 220 210 --overlay --engines casam_engines
      casam-infer ct.nii.gz --box 120 140 200 210 --slice 40 --overlay
      casam-infer series_dir/ --box3d 120 140 30 200 210 52
    """
    warnings.showwarning = _one_line_warning
    try:
        run(images, box, point, label, resolve_engines(engines), out, overlay, as_json, task, backend,
            timings, max_resident, quiet, server, *split_options(options), server_timeout=server_timeout,
            concurrency=concurrency, fail_fast=fail_fast)
    except ImagesFailed:  # each failure has had its own line
        sys.exit(2)
    except CasamError as exc:
        click.echo(f"casam-infer: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. an output folder that cannot be written
        click.echo(f"casam-infer: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)


def split_options(options: dict[str, Any]) -> tuple[VolumeOptions, PromptOptions]:
    fields = VolumeOptions.__dataclass_fields__
    return (VolumeOptions(**{k: v for k, v in options.items() if k in fields}),
            PromptOptions(**{k: v for k, v in options.items() if k not in fields}))


def run(images, box, point, label, engines: Path, out: Path, overlay: bool, as_json: bool, task: Optional[str],
        backend: str, timings: bool, max_resident: int, quiet: bool,
        server: Optional[str] = None, vol: VolumeOptions = VolumeOptions(), popts: PromptOptions = PromptOptions(),
        server_timeout: Optional[float] = None, concurrency: int = 1, fail_fast: bool = False) -> None:
    """casam-infer's work in four stages: check prompts and inputs, open the pipeline, segment
    image by image, then the summary and evaluation. Each stage's errors end the run with
    main()'s one line, except one image's CasamError, which fails only that image."""
    from tqdm import tqdm

    table, files = _check_inputs(images, box, point, label, out, vol, popts)
    pipe = _open_checked(engines, backend, server, max_resident, server_timeout, task, popts.expect_task)
    scores = DeploymentScores(popts.expect_task)
    out.mkdir(parents=True, exist_ok=True)
    backend_info = pipe.describe()
    bar = tqdm(total=len(files), desc="casam-infer", unit="image", disable=quiet or len(files) < 2, file=sys.stderr)
    intensity = pipeline_intensity(pipe)
    r = _Run(pipe=pipe, task=task, out=out, overlay=overlay, as_json=as_json, timings=timings, quiet=quiet,
             vol=vol, popts=popts, table=table, cli_prompts=(box, point, label), scores=scores,
             rng=np.random.default_rng(0),  # --box-jitter draws: the same boxes on every run
             intensity=intensity, backend_info=backend_info, bar=bar)
    try:
        failed = _segment_all(r, files, concurrency, fail_fast)
    finally:  # ends the bar's line, so that a run-ending error's line is not glued onto the bar
        bar.close()
    _finish(r, len(files), failed, fail_fast)


@dataclass
class _Run:
    """What the stages of one ``run`` share: its options, the opened pipeline and the tallies."""

    pipe: Any
    task: Optional[str]
    out: Path
    overlay: bool
    as_json: bool
    timings: bool
    quiet: bool
    vol: VolumeOptions
    popts: PromptOptions
    table: Optional[dict[str, ImagePrompts]]
    cli_prompts: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]], Sequence[int]]  # --box, --point, --label
    scores: DeploymentScores
    rng: Any
    intensity: Intensity
    backend_info: dict[str, Any]
    bar: Any
    routes: Counter = field(default_factory=Counter)
    used: Counter = field(default_factory=Counter)  # output stems taken so far


def _check_inputs(images: Sequence[Path], box: Sequence[Sequence[float]], point: Sequence[Sequence[float]],
                  label: Sequence[int], out: Path, vol: VolumeOptions, popts: PromptOptions
                  ) -> tuple[Optional[dict[str, ImagePrompts]], list[Path]]:
    """(--prompts table, input files), checked before any engine is loaded: a typo in a prompt
    should not cost an engine load. --box3d alone is for volumes only, so it skips the 2-D check."""
    table = read_prompt_file(popts.prompts_file) if popts.prompts_file is not None else None
    if table is None and popts.boxes_from_masks is None and (box or point or not vol.box3d):
        group_prompts(box, point, label)
    if popts.boxes_from_masks is not None and not popts.boxes_from_masks.is_dir():
        raise InputError(f"--boxes-from-masks {popts.boxes_from_masks} is not a folder")
    files = expand_inputs(images)
    if popts.boxes_from_masks is not None:
        _refuse_missing([f.name for f in files if not has_mask(popts.boxes_from_masks, base_stem(f))],
                        f"--boxes-from-masks {popts.boxes_from_masks} has no mask for")
    elif table is not None:
        _refuse_missing([f.name for f in files if f.name not in table], f"{popts.prompts_file} has no prompts for")
    check_out_dir(out, InputError)
    return table, files


def _refuse_missing(names: Sequence[str], what: str) -> None:
    """One InputError naming the first three inputs that lack their prompts, if any do."""
    if names:
        more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
        raise InputError(f"{what} {', '.join(names[:3])}{more}")


def _open_checked(engines: Path, backend: str, server: Optional[str], max_resident: int,
                  server_timeout: Optional[float], task: Optional[str], expect_task: Optional[str]) -> Any:
    """The predictor, refused when --task or --expect-task names a task its export lacks."""
    pipe = open_pipeline(engines, backend, server=server, max_resident=max_resident, server_timeout=server_timeout)
    if task is not None:
        pipe.check_task(task)
    if expect_task is not None:
        pipe.check_task(expect_task)
    return pipe


def _prepare(r: _Run, path: Path) -> tuple[Path, Any]:
    """Read and prompt one input, on this thread and in input order (--box-jitter draws
    stay in order); a failure is returned, to be reported in its place. A --boxes-from-masks
    mask that cannot be used (empty, unreadable; a missing one was refused by _check_inputs)
    is the run's error, not the image's: it ends the run when its turn comes, as a
    sequential run would."""
    vol = r.vol
    try:
        scan = read_scan(path, volume=vol.volume, max_pixels=vol.max_pixels, allow_gaps=vol.allow_gaps,
                         strict_4d=not vol.single_slice)
    except ManifestError:
        raise
    except CasamError as exc:
        return path, exc
    try:
        given = prompts_for(path, scan, r.table, r.popts, vol, r.rng, *r.cli_prompts)
    except CasamError as exc:
        return path, ("fatal", exc)
    try:
        if scan.is_volume and not vol.single_slice:
            return path, ("volume", scan, given)
        if given.box3d:
            raise InputError(f"--box3d is for volumes; {path.name} is a 2-D image: give --box or --point")
        boxes, points, labels = group_prompts(given.boxes, given.points, given.point_labels)
        image, read_warnings = prepared_slice(scan, r.intensity, vol.slice, vol.axis)
    except ManifestError:
        raise
    except CasamError as exc:
        return path, exc
    return path, ("image", image, read_warnings, boxes, points, labels, given)


def _predict(r: _Run, job: tuple[Path, Any]) -> Any:
    """The request itself, up to ``concurrency`` at once; volumes run in order in _segment_all."""
    prepared = job[1]
    if isinstance(prepared, CasamError):
        raise prepared
    if prepared[0] in ("volume", "fatal"):
        return prepared
    _, image, _, boxes, points, labels, _ = prepared
    return prepared, r.pipe.predict(image, boxes=boxes, points=points, point_labels=labels, task=r.task)


def _segment_all(r: _Run, files: Sequence[Path], concurrency: int, fail_fast: bool) -> int:
    """The per-image loop, outputs written in input order; returns how many images failed.

    One image's CasamError (or a volume's) is reported on its own line and the loop goes on
    (stops with --fail-fast); a broken export, an unusable --boxes-from-masks mask and any
    error while writing a 2-D image's outputs end the run."""
    failed = 0
    jobs = (_prepare(r, p) for p in files)  # lazy: in_order prepares each input as its turn nears
    for (path, _), outcome in in_order(functools.partial(_predict, r), jobs, concurrency):
        r.bar.update()
        if not isinstance(outcome, CasamError) and outcome[0] == "fatal":
            raise outcome[1]
        try:
            if isinstance(outcome, CasamError):
                raise outcome
            if outcome[0] == "volume":
                _write_volume(r, path, outcome)
                continue
        except ManifestError:
            raise
        except CasamError as exc:
            failed += 1
            message = str(exc) if path.name in str(exc) else f"{path.name}: {exc}"  # name the image once
            r.bar.write(f"casam-infer: error: {message}", file=sys.stderr)
            if fail_fast:
                break
            continue
        _write_image(r, path, outcome)
    return failed


def _write_volume(r: _Run, path: Path, outcome: tuple[str, Scan, ImagePrompts]) -> None:
    """Segment one volume (in order: it is not a single request) and write and report it."""
    _, scan, given = outcome
    record = run_volume(r.pipe, path, scan, unique_stem(path, r.used), given, r.vol, r.intensity, r.task, r.out,
                        r.overlay, r.backend_info, r.scores)
    _warn(r.bar, path, record["warnings"])
    r.routes[record["route"]] += 1
    _echo(r.bar, record, volume_line(path.name, record), r.as_json, r.quiet)


def _write_image(r: _Run, path: Path, outcome: tuple[tuple[Any, ...], Any]) -> None:
    """Score one predicted 2-D image against its ground truth (if any), write and report it."""
    (_, image, read_warnings, boxes, points, labels, given), result = outcome
    result.warnings[:0] = read_warnings
    _warn(r.bar, path, result.warnings)
    evaluation = r.scores.add_image(path.name, result.route, result.masks, given.truth, given.truth_values)
    record = write_outputs(r.out, unique_stem(path, r.used), str(path), image, result, boxes, points, labels,
                           r.overlay, r.backend_info, {"evaluation": evaluation})
    r.routes[result.route] += 1
    _echo(r.bar, record, describe_line(path.name, record, r.timings), r.as_json, r.quiet)


def _finish(r: _Run, n_files: int, failed: int, fail_fast: bool) -> None:
    """The routes summary, evaluation.json and its line; ImagesFailed (exit 2) if any image failed."""
    if n_files > 1 and not r.quiet and not r.as_json:
        summary = ", ".join(f"{name} {count}" for name, count in sorted(r.routes.items()))
        click.echo(f"routes over {n_files} images: {summary}; outputs in {r.out}")
    if r.popts.boxes_from_masks is not None or r.popts.expect_task is not None:
        atomic_write_json(r.out / "evaluation.json", r.scores.summary())
        if not r.quiet and not r.as_json:
            click.echo(r.scores.line() + f" (details: {r.out / 'evaluation.json'})")
    if failed:
        if n_files > 1:
            click.echo(f"casam-infer: error: {failed} of {n_files} images failed"
                       f"{' (stopped at the first: --fail-fast)' if fail_fast else ''}", err=True)
        raise ImagesFailed(failed)


# ----- concurrent requests (--concurrency, --fail-fast) ---------------------------------------
class ImagesFailed(CasamError):
    """Some images failed; each has been reported on its own line."""


def in_order(fn: Callable[[Any], Any], items: Iterable[Any], concurrency: int) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item) or the CasamError it raised), in input order, with up to
    ``concurrency`` calls in flight.

    The next call is started before a finished one is handed back, so ``concurrency``
    requests stay in flight while the caller writes outputs. A broken export
    (ManifestError) is no single image's failure and ends the run. Leaving the loop early
    cancels the calls not yet started.
    """
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="casam-infer")
    pending: deque[tuple[Any, Future]] = deque()
    queue = iter(items)
    try:
        for item in queue:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) == concurrency:
                break
        while pending:
            item, future = pending.popleft()
            try:
                outcome: Any = future.result()
            except ManifestError:
                raise
            except CasamError as exc:
                outcome = exc
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(fn, following)))
            yield item, outcome
    finally:
        pool.shutdown(wait=False, cancel_futures=True)



def pipeline_intensity(pipe: Any) -> Intensity:
    """The intensity handling the engines were trained with (manifest, or the server's)."""
    prep = getattr(pipe, "preprocessing", None)
    return prep.intensity if prep is not None else pipe.intensity


def _one_line_warning(message: Warning | str, category: type, filename: str, lineno: int,
                      file: Any = None, line: Optional[str] = None) -> None:
    """Library warnings (an unverified export, say) in the CLI's own one-line form."""
    click.echo(f"casam-infer: warning: {message}", err=True)


def _warn(bar: Any, path: Path, warnings: Sequence[str]) -> None:
    for warning in warnings:
        bar.write(f"casam-infer: warning: {path.name}: {warning}", file=sys.stderr)


def _echo(bar: Any, record: dict[str, Any], line: str, as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(record))
    elif not quiet:
        bar.write(line, file=sys.stdout)


if __name__ == "__main__":  # pragma: no cover
    main()
