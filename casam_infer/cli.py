"""casam-infer: segment images with exported CA-SAM engines, routed per image.

Bad input (a missing or corrupt image, an unusable box, a broken export folder, an
unknown task, an --out folder it may not write into) ends the run with exit code 2 and one
line on stderr, never a traceback: at the edge, the person reading the error is rarely the
one who can read Python. The options are in casam_infer/options.py, each input's work in
casam_infer/jobs.py; this module is the command and its loop.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from casam_core.errors import CasamError, ManifestError
from casam_core.files import atomic_write_json
from casam_core.ownership import OutputDir
from casam_infer import verify_deployment
from casam_infer.evaluation import check_click_options, run_clicks
from casam_infer.concurrency import in_order
from casam_infer.dicomweb import PacsSource, check_pacs, pacs_inputs
from casam_infer.inputs import RunEnding, check_inputs, check_prompts, expand_inputs  # noqa: F401 (re-exported)
from runtime.predictor import Predictor, volume_predictor
from runtime.prompt_sources import group_prompts  # noqa: F401 (re-exported)
from casam_infer.jobs import EVALUATION_FILE, Job, RunContext, prepare_job
from casam_infer.options import InferCommand, InferOptions, ServerOptions, SpeedOptions, infer_options
from runtime.scoring import DeploymentScores

DEFAULT_ENGINES = "casam_engines"
COMMAND = "casam-infer"

__all__ = ["main", "run", "open_pipeline", "in_order", "ImagesFailed", "expand_inputs", "group_prompts"]


class ImagesFailed(CasamError):
    """Some images failed; each has been reported on its own line."""


def open_pipeline(engines: Path, speed: SpeedOptions = SpeedOptions(), server: ServerOptions = ServerOptions()) -> Predictor:
    """The one place the CLI creates its predictor: local engines, or a casam server.

    Anything that implements ``runtime.predictor.Predictor`` works below, so a remote
    backend plugs in here without touching the rest.
    """
    if server.server is not None:
        from runtime.remote import RemotePipeline

        return RemotePipeline(server.server, ready_timeout_s=server.server_timeout)
    from runtime.pipeline import Pipeline

    return Pipeline.from_manifest(engines, backend=speed.backend, max_resident=speed.max_resident)


def resolve_engines(engines: Optional[Path]) -> Path:
    if engines is not None:
        return engines
    return Path(os.environ.get("CASAM_ENGINES") or DEFAULT_ENGINES)


@click.command(name=COMMAND, cls=InferCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verify-deployment", type=click.Path(path_type=Path), is_eager=True, expose_value=False,
              callback=verify_deployment.run_option, metavar="ENGINES",
              help="Re-run the int8 export's verification set on this CPU, print a table and exit ($CASAM_BACKEND).")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@infer_options
def main(images: tuple[Path, ...], **params: Any) -> None:
    """Segment IMAGE(s) (files or folders) with CA-SAM: each image is routed to the task whose
    VAE explains it best, or to plain SAM (identity) when none does.

    A volume (NIfTI file, DICOM series folder, multi-frame DICOM) is segmented in 3-D: --box
    on --slice K is propagated outward slice by slice, the volume gets one route, and
    <stem>_mask.nii.gz (plus <stem>_seg.dcm for DICOM) is written. Intensities are windowed
    as the bundle was trained (manifest preprocessing.intensity).

    With --dicomweb URL --study UID instead of IMAGEs, the study's image series are read
    from a DICOMweb server (a PACS) and segmented alike; --store sends each DICOM SEG back
    (docs/PACS.md).

    \b
    Examples:
      casam-infer scan.png --box 40 60 220 210 --overlay --engines casam_engines
      casam-infer ct.nii.gz --box 120 140 200 210 --slice 40 --overlay
      casam-infer series_dir/ --box3d 120 140 30 200 210 52
      casam-infer --dicomweb http://127.0.0.1:8042/dicom-web --study 1.2.3 --box 40 60 220 210 --store
    """
    warnings.showwarning = _one_line_warning
    try:
        run(images, InferOptions.from_params(params))
    except ImagesFailed:  # each failure has had its own line
        sys.exit(2)
    except OSError as exc:  # e.g. an output folder that cannot be written
        raise CasamError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc


def run(images: Sequence[Path], opts: InferOptions) -> None:
    """casam-infer's work in four stages: check prompts, inputs (or the --dicomweb request)
    and --out, open the pipeline, segment input by input, then the summary and evaluation.
    Each stage's errors end the run with one line, except one input's own CasamError (or one
    PACS series' retrieval error), which fails only that input."""
    check_click_options(opts)
    pacs = check_pacs(images, opts.pacs, opts.volumes)
    if pacs is None and not images:
        raise click.UsageError("give IMAGE(s) to segment, or --dicomweb URL --study UID")
    if pacs is None:
        table, files = check_inputs(images, opts.prompts, opts.volumes)
    else:
        check_prompts(opts.prompts, opts.volumes)  # a typo in a prompt should not cost a download
    out = OutputDir(opts.outputs.out, COMMAND, overwrite=opts.outputs.overwrite, reserved=[EVALUATION_FILE]).claim()
    try:
        if pacs is None:
            _segment_files(files, table, opts, out)
        else:
            _segment_pacs(pacs, opts, out)
    finally:
        out.close()  # a folder this run made and left empty is removed


def _segment_pacs(pacs: PacsSource, opts: InferOptions, out: OutputDir) -> None:
    """--dicomweb: retrieve the study's series into a temporary folder, then segment those
    folders exactly as local series (storing each SEG with --store); exit 2 if any failed."""
    with pacs_inputs(pacs, lambda line: click.echo(f"{COMMAND}: error: {line}", err=True)) as inputs:
        if inputs.folders:
            table, files = check_inputs(inputs.folders, opts.prompts, opts.volumes, known=inputs.series)
            _segment_files(files, table, opts, out, inputs.store)
    if inputs.failed:
        raise ImagesFailed(inputs.failed)


def _segment_files(files: Sequence[Path], table: Any, opts: InferOptions, out: OutputDir, store: Any = None) -> None:
    """Open the pipeline, segment every input in order, then the summary (ImagesFailed if any failed)."""
    from tqdm import tqdm

    pipe = _open_checked(opts)
    out.ensure()  # an unwritable --out fails here, before the first image
    if opts.prompts.clicks is not None:  # the interactive protocol: sessions, evaluation.json only
        if run_clicks(volume_predictor(pipe, "--clicks"), files, opts, out):
            raise ImagesFailed("some inputs failed")
        return
    ctx = RunContext(pipe, opts, out, table, DeploymentScores(opts.prompts.expect_task), pipe.describe(),
                     store=store)
    bar = tqdm(total=len(files), desc=COMMAND, unit="image", disable=opts.outputs.quiet or len(files) < 2,
               file=sys.stderr)
    try:
        routes, failed = _segment_all(ctx, files, bar)
    finally:  # ends the bar's line, so that a run-ending error's line is not glued onto the bar
        bar.close()
    _finish(ctx, routes, len(files), failed)


def _open_checked(opts: InferOptions) -> Predictor:
    """The predictor, refused when --task or --expect-task names a task its export lacks."""
    pipe = open_pipeline(resolve_engines(opts.general.engines), opts.speed, opts.server)
    for task in (opts.general.task, opts.prompts.expect_task):
        if task is not None:
            pipe.check_task(task)
    return pipe


def _segment_all(ctx: RunContext, files: Sequence[Path], bar: Any) -> tuple[Counter, int]:
    """The per-input loop, outputs written in input order; returns (routes, failures).

    One input's CasamError is reported on its own line and the loop goes on (stops with
    --fail-fast); a broken export, an unusable --boxes-from-masks mask and any error while
    writing a 2-D image's outputs (RunEnding) end the run."""
    outputs = ctx.opts.outputs
    routes: Counter = Counter()
    failed = 0
    jobs = (prepare_job(ctx, p) for p in files)  # lazy: in_order prepares each input as its turn nears
    for job, outcome in in_order(lambda j: j.predict(ctx), jobs, ctx.opts.speed.concurrency):
        bar.update()
        try:
            if isinstance(outcome, CasamError):
                raise outcome
            record = job.finish(ctx, outcome)
        except (ManifestError, RunEnding):
            raise
        except CasamError as exc:
            failed += 1
            message = str(exc) if job.path.name in str(exc) else f"{job.path.name}: {exc}"  # name the input once
            bar.write(f"{COMMAND}: error: {message}", file=sys.stderr)
            if outputs.fail_fast:
                break
            continue
        _report(bar, job, record, outputs.as_json, outputs.quiet, outputs.timings)
        routes[record["route"]] += 1
    return routes, failed


def _report(bar: Any, job: Job, record: dict[str, Any], as_json: bool, quiet: bool, timings: bool) -> None:
    """An input's warnings on stderr, then its JSON record or its line on stdout."""
    for warning in record["warnings"]:
        bar.write(f"{COMMAND}: warning: {job.path.name}: {warning}", file=sys.stderr)
    if as_json:
        click.echo(json.dumps(record))
    elif not quiet:
        bar.write(job.describe(record, timings), file=sys.stdout)


def _finish(ctx: RunContext, routes: Counter, n_files: int, failed: int) -> None:
    """The routes summary, evaluation.json and its line; ImagesFailed (exit 2) if any image failed."""
    outputs, out = ctx.opts.outputs, ctx.out.path
    speak = not outputs.quiet and not outputs.as_json
    if n_files > 1 and speak:
        summary = ", ".join(f"{name} {count}" for name, count in sorted(routes.items()))
        click.echo(f"routes over {n_files} images: {summary}; outputs in {out}")
    if ctx.opts.prompts.boxes_from_masks is not None or ctx.opts.prompts.expect_task is not None:
        with ctx.out.group() as staging:
            atomic_write_json(staging / EVALUATION_FILE, ctx.scores.summary())
        if speak:
            click.echo(ctx.scores.line() + f" (details: {out / EVALUATION_FILE})")
    if failed:
        if n_files > 1:
            click.echo(f"{COMMAND}: error: {failed} of {n_files} images failed"
                       f"{' (stopped at the first: --fail-fast)' if outputs.fail_fast else ''}", err=True)
        raise ImagesFailed(failed)


def _one_line_warning(message: Warning | str, category: type, filename: str, lineno: int,
                      file: Any = None, line: Optional[str] = None) -> None:
    """Library warnings (an unverified export, say) in the CLI's own one-line form."""
    click.echo(f"{COMMAND}: warning: {message}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
