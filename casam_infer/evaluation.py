"""casam-infer --boxes-from-masks DIR --clicks N: the interactive evaluation.

Each input is opened as an interactive session (``runtime.sessions``, the code casam-label
serves to viewers), routed once, and every structure of its mask runs the challenge's
protocol (``runtime.sessions.clicks``): the box, then N simulated clicks. The run writes one
``evaluation.json``: per image the Dice and NSD after each interaction and their AUCs, with
its route; per route and overall the means of those per-image values. Nothing else is
written: the masks of a simulated annotator are not anyone's result.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import click
import numpy as np

from casam_core.errors import CasamError, InputError, ManifestError
from casam_core.files import atomic_write_json
from casam_core.metrics import ndimage
from casam_core.ownership import OutputDir
from casam_infer.inputs import RunEnding, prompts_for
from casam_infer.jobs import EVALUATION_FILE
from casam_infer.options import InferOptions
from casam_io.image_io import Scan, read_scan
from runtime.predictor import VolumePredictor
from runtime.sessions import SessionOptions, SessionSource, SessionStore, StoreOptions
from runtime.sessions.clicks import NSD_MIN_DICE, TIE_SEED, Protocol, auc, auc_all, evaluate_structure

#: The embedding cache of the run's one session at a time: a 64-slice volume and its clicks.
CACHE_MB = 512
METRICS = ("dice", "nsd")


def check_click_options(opts: InferOptions) -> None:
    """--clicks' own preconditions, before any input is read or engine loaded."""
    p, v, o = opts.prompts, opts.volumes, opts.outputs
    if p.clicks is None:
        return
    if p.boxes_from_masks is None:
        raise InputError("--clicks needs --boxes-from-masks DIR: the clicks are simulated from the true masks")
    ndimage()  # scipy (the eval extra), or one line naming the extra, before any engine loads
    refused = [(p.prompts_file is not None, "--prompts"), (bool(p.box or p.point or v.box3d), "--box/--point/--box3d"),
               (opts.server.server is not None, "--server"), (v.single_slice, "--single-slice"),
               (v.per_slice, "--route-per-slice"), (o.overlay, "--overlay"),
               (p.expect_task is not None, "--expect-task")]
    given = [name for on, name in refused if on]
    if given:
        raise InputError(f"--clicks cannot be combined with {given[0]}: the protocol takes its box from the mask, "
                         "runs on local engines through a session routed once, and writes evaluation.json only")


def spacing_of(scan: Scan, axes: int) -> tuple[tuple[float, ...], str]:
    """mm per array axis (from a volume's affine), or 1 per pixel for an image: (spacing, unit)."""
    if scan.is_volume and scan.affine is not None:
        return tuple(float(s) for s in np.linalg.norm(np.asarray(scan.affine)[:3, :3], axis=0)[:axes]), "mm"
    return (1.0,) * axes, "pixel"


def evaluate_input(store: SessionStore, path: Path, scan: Scan, opts: InferOptions, rng: Any) -> dict[str, Any]:
    """One input through a fresh session: every structure of its mask, one label each."""
    given = prompts_for(path, scan, None, opts.prompts, opts.volumes, rng)
    assert given.truth is not None  # --boxes-from-masks always gives it
    source = SessionSource.open(scan, store.pipe.preprocessing, opts.volumes.axis)
    truth = given.truth
    spacing, unit = spacing_of(scan, truth.ndim)
    protocol = Protocol(opts.prompts.clicks or 0, spacing, opts.prompts.nsd_tolerance)
    session = store.create(source, options=SessionOptions(task=opts.general.task, prefetch=0))
    try:
        structures = []
        for i, value in enumerate(given.truth_values):
            box = None if source.is_volume else given.boxes[i]
            curve = evaluate_structure(session, f"structure{value}", truth == value, protocol, box)
            structures.append({"value": int(value), **curve.to_dict(protocol.clicks)})
        assert session.route is not None
        route = session.route
    finally:
        store.close(session.id)
    record: dict[str, Any] = {"image": path.name, "route": route.route, "route_mode": route.mode,
                              "spacing": list(spacing), "spacing_unit": unit}
    for metric in METRICS:  # the image's curve: the mean over its structures, as the challenge's multi-class mean
        curve = np.mean([s[metric] for s in structures], axis=0)
        record[metric] = [float(v) for v in curve]
        record[f"{metric}_auc"], record[f"{metric}_auc_all"] = auc(record[metric], protocol.clicks), auc_all(curve)
        record[f"{metric}_final"] = record[metric][-1]
    record["structures"] = structures
    return record


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept and len(kept) == len(values) else None


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The means of the per-image values: curves point by point, AUCs and finals."""
    if not records:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(records)}
    for metric in METRICS:
        out[metric] = [float(v) for v in np.mean([r[metric] for r in records], axis=0)]
        for key in (f"{metric}_auc", f"{metric}_auc_all", f"{metric}_final"):
            out[key] = _mean([r[key] for r in records])
    return out


def summary(records: Sequence[dict[str, Any]], opts: InferOptions) -> dict[str, Any]:
    """evaluation.json: the protocol, each image, each route's means, and the overall means."""
    by_route: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_route[r["route"]].append(r)
    protocol = {"name": "CVPR 2025 interactive 3D biomedical segmentation (CVPR25_iter_eval.py)",
                "clicks": opts.prompts.clicks, "nsd_tolerance": opts.prompts.nsd_tolerance,
                "nsd_min_dice": NSD_MIN_DICE, "tie_seed": TIE_SEED, "box_jitter": opts.prompts.box_jitter,
                "axis": opts.volumes.axis,
                "auc": "trapezoid over the N click interactions, unit step, not normalised (the challenge's)",
                "auc_all": "trapezoid over interactions 0..N (box included) divided by N"}
    return {"protocol": protocol, "images": list(records),
            "per_route": {route: aggregate(rs) for route, rs in sorted(by_route.items())},
            "overall": aggregate(records)}


def _line(record: dict[str, Any]) -> str:
    d, n = record["dice"], record["nsd"]
    return (f"{record['image']}: route {record['route']}; Dice box {d[0]:.3f} → {d[-1]:.3f}, "
            f"NSD {n[0]:.3f} → {n[-1]:.3f} after {len(d) - 1} click(s)")


def run_clicks(pipe: VolumePredictor, files: Sequence[Path], opts: InferOptions, out: OutputDir) -> int:
    """Every input through the protocol, evaluation.json written; returns how many failed
    (each reported on its own line). A broken export or an unusable mask ends the run."""
    vol, quiet = opts.volumes, opts.outputs.quiet or opts.outputs.as_json
    store = SessionStore(pipe, StoreOptions(cache_mb=CACHE_MB, max_sessions=1, prefetch=False))
    rng, records, failed = np.random.default_rng(0), [], 0
    try:
        for path in files:
            try:
                scan = read_scan(path, volume=vol.volume, max_pixels=vol.max_pixels, allow_gaps=vol.allow_gaps,
                                 strict_4d=True)
                records.append(evaluate_input(store, path, scan, opts, rng))
            except (ManifestError, RunEnding):
                raise
            except CasamError as exc:
                failed += 1
                message = str(exc) if path.name in str(exc) else f"{path.name}: {exc}"
                click.echo(f"casam-infer: error: {message}", err=True)
                if opts.outputs.fail_fast:
                    break
                continue
            if opts.outputs.as_json:
                click.echo(json.dumps(records[-1]))
            elif not quiet:
                click.echo(_line(records[-1]))
    finally:
        store.shutdown()
    with out.group() as staging:
        atomic_write_json(staging / EVALUATION_FILE, summary(records, opts))
    if not quiet:
        click.echo(f"evaluation: {len(records)} image(s), details in {out.path / EVALUATION_FILE}")
    return failed
