"""Evaluating a bundle, and the paper's continual protocol over a sequence of tasks and methods.

A seen task is always scored on the test split recorded in its bundle folder, so an
evaluation never touches the images its alignment layer or VAE were trained on.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from casam_core.files import PathLike
from models.casam import CASAM, routes_to_names
from models.sam_loader import load_frozen_sam, sam_preprocessing
from casam_core.errors import InputError
from casam_core.files import atomic_write_json, atomic_write_text
from casam_core.names import IDENTITY, check_task_name
from runtime.preprocess import Preprocessing
from casam_bundle import Bundle, BundleError
from models.bundle_models import build_model
from trainer.data import Dataset, load_dataset, load_images
from casam_core.metrics import continual_metrics
from trainer.evaluate import EvalPass, SetResult, evaluate_set, format_table, rejection_rate, route_embeddings
from trainer.methods import DEFAULT_METHODS, METHODS, REFERENCE, Context, MethodRun, parse_methods
from trainer.report import render_report
from trainer.session import Session, SessionOptions, check_bundle_sam, open_bundle_session, open_session
from trainer.train_task import TrainConfig



def task_test_set(bundle: Bundle, name: str, path: PathLike) -> Dataset:
    """The dataset at ``path`` split exactly as recorded when task ``name`` was trained, and
    prepared with the bundle's recorded intensity handling (the one its models were trained on)."""
    record = bundle.load_split(name)
    return load_dataset(path, seed=int(record.get("seed", 0)), split=record, axis=int(record.get("axis", 2)),
                        intensity=bundle.preprocessing.intensity, volume=record.get("volume"))


def _evaluate_task(session: Session, bundle: Bundle, model, name: str, dataset: Dataset, quiet: bool) -> SetResult:
    samples = dataset.test if name in bundle.task_names else dataset.samples
    embeddings = session.cache.embeddings(samples, desc=f"embedding {name}")
    expected = name if name in model.task_names else None
    return evaluate_set(model, embeddings, samples, bundle.preprocessing, name, EvalPass(expected=expected), quiet)


def evaluate_bundle(
    bundle_dir: PathLike,
    data: Sequence[tuple[str, str]],
    ood: Sequence[str] = (),
    *,
    session: SessionOptions = SessionOptions(),
) -> dict[str, Any]:
    """Routed IoU/BIoU and routing accuracy per dataset, rejection rate per OOD set.

    Every set, seen, unseen or OOD, is prepared with the bundle's recorded intensity
    handling, as casam-infer prepares it: a rejection rate measured on other grey levels
    would say nothing about the deployment.
    """
    bundle = Bundle.open(bundle_dir)
    intensity = bundle.preprocessing.intensity
    options, quiet = session, session.quiet
    session = open_bundle_session(bundle, options)
    model = build_model(bundle, session.sam.model).to(session.device)
    rows: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    for name, path in data:
        dataset = (task_test_set(bundle, name, path) if name in bundle.task_names
                   else load_dataset(path, intensity=intensity))
        result = _evaluate_task(session, bundle, model, name, dataset, quiet)
        tasks.append(result.to_dict())
        rows.append({"set": name, "images": result.count, "IoU": result.iou, "BIoU": result.biou,
                     "routing acc": result.routing_accuracy, "OOD rejected": None})
    ood_out: list[dict[str, Any]] = []
    for path in ood:
        samples = load_images(path, intensity)
        rate, routes = rejection_rate(model, session.cache.embeddings(samples, desc=f"embedding {Path(path).name}"))
        ood_out.append({"path": str(path), "count": len(samples), "rejection_rate": rate,
                        "routes": {r: routes.count(r) for r in sorted(set(routes))}})
        rows.append({"set": f"OOD {Path(path).name}", "images": len(samples), "IoU": None, "BIoU": None,
                     "routing acc": None, "OOD rejected": rate})
    table = format_table(rows, ["set", "images", "IoU", "BIoU", "routing acc", "OOD rejected"])
    return {"bundle": str(bundle.root), "task_order": bundle.task_names, "tasks": tasks, "ood": ood_out, "table": table}



# --------------------------------------------------------------------------------------
# The continual protocol: several methods, one task order, one zero-shot table.
# --------------------------------------------------------------------------------------

Matrix = list[list[Optional[float]]]


def _matrix_csv(matrix: Matrix, names: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task \\ after stage"] + [f"{t + 1}:{n}" for t, n in enumerate(names)])
    for k, row in enumerate(matrix):
        writer.writerow([names[k]] + ["" if v is None else f"{v:.6f}" for v in row])
    return buffer.getvalue()


def zero_shot_row(set_name: str, results: dict[str, SetResult], reference: str = REFERENCE) -> dict[str, Any]:
    """One unseen set's row: each method's IoU/BIoU and its drop against ``reference``.

    ``drop = reference − method`` (fractions; positive means the method lost accuracy
    against plain SAM on the same images, the paper's Table 2 reading). CA-SAM's rejection
    rate is the share of images it routed to the identity. Refuses results that were not
    computed on the same images in the same order, since a drop between different image
    sets means nothing.
    """
    stems = {m: [p["stem"] for p in r.per_image] for m, r in results.items()}
    first = next(iter(stems.values()), [])
    if any(s != first for s in stems.values()):
        raise ValueError(f"zero-shot results for {set_name!r} were computed on different images")
    ref = results.get(reference)
    row: dict[str, Any] = {"set": set_name, "count": len(first), "methods": {}}
    for m, r in results.items():
        row["methods"][m] = {
            "iou": r.iou, "biou": r.biou,
            "iou_drop": None if ref is None else ref.iou - r.iou,
            "biou_drop": None if ref is None else ref.biou - r.biou,
        }
    casam = results.get("casam")
    row["rejection_rate"] = None if casam is None else float(np.mean([r == IDENTITY for r in casam.routes]))
    return row


def _check_inputs(tasks: Sequence[tuple[str, str]], ood: Sequence[tuple[str, str]], config: TrainConfig) -> None:
    """Cheap checks before any image is read or any epoch run."""
    names = [n for n, _ in tasks] + [n for n, _ in ood]
    for n in names:
        check_task_name(n)
    if len(set(names)) != len(names):
        raise InputError(f"task and --ood names must be distinct, got {', '.join(names)}")
    if not tasks:
        raise InputError("the protocol needs at least one task")
    config.check()


def _existing_bundle(bundle_dir: Optional[Path]) -> Optional[Bundle]:
    exists = bundle_dir is not None and (bundle_dir / "bundle.json").exists()
    return Bundle.open(bundle_dir, verify=False) if exists else None  # type: ignore[arg-type]


def _protocol_preprocessing(bundle: Optional[Bundle], sam: str, resize: Optional[str]) -> Preprocessing:
    """The preprocessing every method shares: the bundle's, if one exists (refusing another
    SAM or resize mode), else a new bundle's (which train_task will record)."""
    if bundle is None:
        return sam_preprocessing(sam, resize)
    check_bundle_sam(bundle, sam)
    if resize is not None and resize != bundle.preprocessing.resize:
        raise BundleError(f"bundle {bundle.root} uses resize mode {bundle.preprocessing.resize!r}, not {resize!r}")
    return bundle.preprocessing


def _load_task_sets(bundle: Optional[Bundle], tasks: Sequence[tuple[str, str]], seed: int,
                    prep: Preprocessing) -> list[Dataset]:
    """Every task's dataset, validated before any training, split as training will split it
    (or as recorded, for a task already in the bundle), prepared with ``prep``'s intensity
    handling, the one train_task trains the bundle's tasks on."""
    return [task_test_set(bundle, n, p) if bundle is not None and n in bundle.task_names
            else load_dataset(p, seed=seed, intensity=prep.intensity) for n, p in tasks]


def _open_protocol_session(bundle: Optional[Bundle], options: SessionOptions, prep: Preprocessing) -> Session:
    """The frozen SAM with ``prep``; a bundle's checkpoint sha256 must match the loaded one."""
    session = open_session(options, prep)
    if bundle is not None:
        check_bundle_sam(bundle, session.sam.name, session.checkpoint_sha256)
    return session


def _run_stages(runs: dict[str, MethodRun], ctx: Context, tasks: Sequence[tuple[str, str]],
                datasets: list[Dataset]) -> tuple[dict[str, Matrix], dict[str, Matrix], list[torch.Tensor]]:
    """Stage t: every method learns task t, then is scored on tasks 1..t."""
    n = len(tasks)
    iou = {m: [[None] * n for _ in range(n)] for m in runs}
    biou = {m: [[None] * n for _ in range(n)] for m in runs}
    test_embs: list[torch.Tensor] = []
    for t, (name, path) in enumerate(tasks):
        dataset = datasets[t]
        emb = ctx.session.cache.embeddings(dataset.samples, desc=f"embedding {name}")
        n_train = len(dataset.train)
        test_embs.append(emb[n_train:])
        for m in sorted(runs, key=lambda m: m != "casam"):  # casam first: naive may reuse its task-1 layer
            runs[m].train(t, name, path, dataset, emb[:n_train])
        del emb
        for m, run in runs.items():
            for k in range(t + 1):
                result = run.evaluate(tasks[k][0], datasets[k].test, test_embs[k], seen=True)
                iou[m][k][t], biou[m][k][t] = result.iou, result.biou
    return iou, biou, test_embs


def _zero_shot(runs: dict[str, MethodRun], ctx: Context, ood: Sequence[tuple[str, Dataset]]
               ) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    rows, embs = [], []
    for name, dataset in ood:
        emb = ctx.session.cache.embeddings(dataset.samples, desc=f"embedding {name}")
        embs.append(emb)
        rows.append(zero_shot_row(name, {m: run.evaluate(name, dataset.samples, emb, seen=False) for m, run in runs.items()}))
    return rows, embs


def routing_diagnostics(model: CASAM, bundle: Bundle, sets: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """What a user checks to trust the thresholds, from the final CA-SAM model.

    ``confusion[i][j]``: images of set i (a seen task's test split or an OOD set) routed to
    column j (a task or the identity). ``vae_scores[task]``: the task's K-fold held-out
    calibration scores (from which τ was taken), τ itself, and the scores its VAE gives
    to every set's images.
    """
    columns = list(model.task_names) + [IDENTITY]
    confusion, scores_by_set = [], {}
    for set_name, emb in sets:
        routes, scores = route_embeddings(model, emb)
        names = routes_to_names(routes, model.task_names)
        confusion.append([names.count(c) for c in columns])
        scores_by_set[set_name] = scores
    vae_scores = {}
    for k, task in enumerate(model.task_names):
        vae_scores[task] = {
            "threshold": float(model.thresholds[k]),
            "held_out": [float(s) for s in bundle.load_calibration(task).get("scores", [])],
            "sets": {s: [float(v) for v in scores_by_set[s][:, k]] for s, _ in sets},
        }
    return {"rows": [s for s, _ in sets], "columns": columns, "confusion": confusion, "vae_scores": vae_scores}


def _write_outputs(out_dir: Path, report: dict[str, Any]) -> None:
    names = report["tasks"]
    for m, result in report["results"].items():
        atomic_write_text(out_dir / f"{m}_iou_matrix.csv", _matrix_csv(result["iou_matrix"], names))
        atomic_write_text(out_dir / f"{m}_biou_matrix.csv", _matrix_csv(result["biou_matrix"], names))
    atomic_write_json(out_dir / "sequence.json", report)
    atomic_write_text(out_dir / "report.html", render_report(report))


def run_sequence(
    bundle_dir: Optional[PathLike],
    tasks: Sequence[tuple[str, str]],
    out: PathLike,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    ood: Sequence[tuple[str, str]] = (),
    session: SessionOptions = SessionOptions(),
    config: TrainConfig = TrainConfig(),
    resize: Optional[str] = None,
) -> dict[str, Any]:
    """Train ``tasks`` in order with every method; after stage t score tasks 1..t; after
    the last stage score the ``ood`` sets zero-shot. Writes sequence.json, per-method
    IoU/BIoU CSVs, report.html and the naive layer's per-stage weights under ``out``.

    CA-SAM tasks already in the bundle (e.g. from an interrupted sequence) are not retrained.
    """
    methods = parse_methods(methods)
    _check_inputs(tasks, ood, config)
    root = Path(bundle_dir) if bundle_dir is not None else None
    if "casam" in methods and root is None:
        raise InputError("method 'casam' needs --bundle (the bundle its tasks are added to)")
    existing = _existing_bundle(root)  # read once: the shared preprocessing, recorded splits, checkpoint check
    prep = _protocol_preprocessing(existing, session.sam, resize)
    datasets = _load_task_sets(existing, tasks, config.seed, prep)
    ood_sets = [(n, load_dataset(p, seed=config.seed, intensity=prep.intensity)) for n, p in ood]
    if session.frozen_sam is None:
        session = replace(session, frozen_sam=load_frozen_sam(session.sam, Path(session.checkpoint) if session.checkpoint else None))
    opened = _open_protocol_session(existing, session, prep)
    out_dir = Path(out)
    ctx = Context(opened, config, opened.cache.preprocessing, out_dir, root, session, resize)
    runs = {m: METHODS[m].start(ctx) for m in methods}
    iou, biou, test_embs = _run_stages(runs, ctx, tasks, datasets)
    zero_shot, ood_embs = _zero_shot(runs, ctx, ood_sets)
    report = _protocol_report(ctx, runs, tasks, datasets, (iou, biou))
    report["zero_shot"] = zero_shot
    report["ood"] = [{"name": n, "path": str(p), "count": len(d.samples)} for (n, p), (_, d) in zip(ood, ood_sets)]
    if "casam" in runs:
        names = [n for n, _ in tasks]
        report["routing"] = routing_diagnostics(runs["casam"].model, Bundle.open(root),
                                                list(zip(names, test_embs)) + [(n, e) for (n, _), e in zip(ood, ood_embs)])
    report["files"] = (["sequence.json", "report.html"] + [f"{m}_{k}_matrix.csv" for m in methods for k in ("iou", "biou")]
                       + [str(Path(s["weights"]).relative_to(out_dir)) for s in getattr(runs.get("naive"), "trained", [])])
    _write_outputs(out_dir, report)
    report["training"] = {m: run.trained for m, run in runs.items() if METHODS[m].trains}
    return report


def _protocol_report(ctx: Context, runs: dict[str, MethodRun], tasks: Sequence[tuple[str, str]],
                     datasets: list[Dataset], matrices: tuple[dict[str, Matrix], dict[str, Matrix]]) -> dict[str, Any]:
    """sequence.json's core: per-method matrices and continual metrics, the SAM and the settings."""
    iou, biou = matrices
    sizes = [len(d.test) for d in datasets]
    fill = lambda m: [[np.nan if v is None else v for v in row] for row in m]  # noqa: E731
    results = {m: {"label": METHODS[m].label, "iou_matrix": iou[m], "biou_matrix": biou[m],
                   "iou": continual_metrics(fill(iou[m]), sizes), "biou": continual_metrics(fill(biou[m]), sizes)}
               for m in runs}
    sam = ctx.session.sam
    return {
        "tasks": [n for n, _ in tasks], "test_sizes": sizes, "methods": list(runs), "reference": REFERENCE,
        "results": results, "zero_shot": [], "ood": [],
        "sam": {"model": sam.name, "checkpoint_sha256": ctx.session.checkpoint_sha256, "untrained": sam.untrained},
        "config": asdict(ctx.config), "preprocessing": ctx.prep.to_dict(),
        "bundle": str(ctx.bundle_dir) if ctx.bundle_dir else None,
        "trained": {m: [s["task"] for s in run.trained] for m, run in runs.items() if METHODS[m].trains},
    }
