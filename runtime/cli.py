"""casam-infer: segment images with exported CA-SAM engines, routed per image.

Bad input (a missing or corrupt image, an unusable box, a broken export folder, an
unknown task) ends the run with exit code 2 and one line on stderr, never a traceback:
at the edge, the person reading the error is rarely the one who can read Python.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import click
import numpy as np

from runtime.backends import BACKENDS
from runtime.errors import CasamError, InputError
from runtime.image_io import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, read_image
from runtime.outputs import write_outputs

DEFAULT_ENGINES = "casam_engines"
INPUT_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


def open_pipeline(engines: Path, backend: str = "auto", server: Optional[str] = None, max_resident: int = 8) -> Any:
    """The one place the CLI creates its predictor: local engines, or a casam server.

    Anything with ``predict(image, boxes=, points=, point_labels=, task=)`` returning a
    ``Result`` works below, so a remote backend plugs in here without touching the rest.
    """
    if server is not None:
        from runtime.remote import RemotePipeline

        return RemotePipeline(server)
    from runtime.pipeline import Pipeline

    return Pipeline.from_manifest(engines, backend=backend, max_resident=max_resident)


def resolve_engines(engines: Optional[Path]) -> Path:
    if engines is not None:
        return engines
    return Path(os.environ.get("CASAM_ENGINES") or DEFAULT_ENGINES)


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders → their image files (not recursive), sorted by name."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
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


def describe_line(name: str, record: dict[str, Any], timings: bool) -> str:
    scores = ", ".join(
        f"{t} {s:.4g}{' ≤' if s <= record['thresholds'][t] else ' >'} τ {record['thresholds'][t]:.4g}"
        for t, s in record["scores"].items()
    )
    ious = ", ".join(f"{p['iou']:.3f}" for p in record["prompts"])
    line = f"{name}: route {record['route']} ({scores or 'no tasks'}); {len(record['prompts'])} mask(s), IoU {ious}"
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
              help="auto: TensorRT engines built for this GPU, else ORT CUDA if usable, else ORT CPU.")
@click.option("--timings", is_flag=True, help="Print per-stage milliseconds for each image.")
@click.option("--slice", "nifti_slice", type=int, default=None, metavar="K",
              help="Slice index of NIfTI volumes (default: the middle slice).")
@click.option("--max-resident", type=click.IntRange(min=1), default=8, show_default=True,
              help="Alignment engines kept loaded at once (least recently used ones are dropped).")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-image lines; errors still go to stderr.")
@click.option("--server", default=None, metavar="URL",
              help="Send each image to a casam-serve server (http://HOST:8000 or grpc://HOST:8001) "
                   "instead of running local engines; outputs are the same.")
def main(images: tuple[Path, ...], box, point, label, engines: Optional[Path], out: Path, overlay: bool,
         as_json: bool, task: Optional[str], backend: str, timings: bool, nifti_slice: Optional[int],
         max_resident: int, quiet: bool, server: Optional[str]) -> None:
    """Segment IMAGE(s) (files or folders) with CA-SAM: each image is routed to the task whose
    VAE explains it best, or to plain SAM (identity) when none does.

    \b
    Example:
      casam-infer scan.png --box 40 60 220 210 --overlay --engines casam_engines
    """
    try:
        run(images, box, point, label, resolve_engines(engines), out, overlay, as_json, task, backend,
            timings, nifti_slice, max_resident, quiet, server)
    except CasamError as exc:
        click.echo(f"casam-infer: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. an output folder that cannot be written
        click.echo(f"casam-infer: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)


def run(images, box, point, label, engines: Path, out: Path, overlay: bool, as_json: bool, task: Optional[str],
        backend: str, timings: bool, nifti_slice: Optional[int], max_resident: int, quiet: bool,
        server: Optional[str] = None) -> None:
    from tqdm import tqdm

    boxes, points, labels = group_prompts(box, point, label)
    files = expand_inputs(images)
    pipe = open_pipeline(engines, backend, server=server, max_resident=max_resident)
    if task is not None:
        pipe.check_task(task)
    out.mkdir(parents=True, exist_ok=True)
    backend_info = pipe.describe()
    routes: Counter = Counter()
    used: Counter = Counter()
    bar = tqdm(files, desc="casam-infer", unit="image", disable=quiet or len(files) < 2, file=sys.stderr)
    for path in bar:
        image = read_image(path, nifti_slice)
        result = pipe.predict(image, boxes=boxes, points=points, point_labels=labels, task=task)
        for warning in result.warnings:
            bar.write(f"casam-infer: warning: {path.name}: {warning}", file=sys.stderr)
        record = write_outputs(out, unique_stem(path, used), str(path), image, result, boxes, points, labels,
                               overlay, backend_info)
        routes[result.route] += 1
        if as_json:
            click.echo(json.dumps(record))
        elif not quiet:
            bar.write(describe_line(path.name, record, timings), file=sys.stdout)
    if len(files) > 1 and not quiet and not as_json:
        summary = ", ".join(f"{name} {count}" for name, count in sorted(routes.items()))
        click.echo(f"routes over {len(files)} images: {summary}; outputs in {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
