"""Evaluating a bundle, and the paper's continual protocol over a sequence of tasks.

A seen task is always scored on the test split recorded in its bundle folder, so an
evaluation never touches the images its alignment layer or VAE were trained on.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from models.sam_loader import FrozenSam, load_frozen_sam
from runtime.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from casam_bundle import Bundle
from models.bundle_models import build_model
from trainer.data import Dataset, load_dataset, load_images
from trainer.evaluate import SetResult, evaluate_set, format_table, rejection_rate
from runtime.metrics import continual_metrics
from trainer.session import Session, open_bundle_session
from trainer.train_task import TrainConfig, train_task

PathLike = Union[str, os.PathLike]


def task_test_set(bundle: Bundle, name: str, path: PathLike) -> Dataset:
    """The dataset at ``path`` split exactly as recorded when task ``name`` was trained."""
    record = bundle.load_split(name)
    return load_dataset(path, seed=int(record.get("seed", 0)), split=record, axis=int(record.get("axis", 2)))


def _evaluate_task(session: Session, bundle: Bundle, model, name: str, dataset: Dataset, quiet: bool) -> SetResult:
    samples = dataset.test if name in bundle.task_names else dataset.samples
    embeddings = session.cache.embeddings(samples, desc=f"embedding {name}")
    expected = name if name in model.task_names else None
    return evaluate_set(model, embeddings, samples, bundle.preprocessing, name, expected=expected, quiet=quiet)


def evaluate_bundle(
    bundle_dir: PathLike,
    data: Sequence[tuple[str, str]],
    ood: Sequence[str] = (),
    *,
    checkpoint: Optional[PathLike] = None,
    device: str = "auto",
    cache_dir: Optional[PathLike] = None,
    quiet: bool = False,
    frozen_sam: Optional[FrozenSam] = None,
) -> dict[str, Any]:
    """Routed IoU/BIoU and routing accuracy per dataset, rejection rate per OOD set."""
    bundle = Bundle.open(bundle_dir)
    session = open_bundle_session(bundle, checkpoint, device, cache_dir, quiet, frozen_sam)
    model = build_model(bundle, session.sam.model).to(session.device)
    rows: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    for name, path in data:
        dataset = task_test_set(bundle, name, path) if name in bundle.task_names else load_dataset(path)
        result = _evaluate_task(session, bundle, model, name, dataset, quiet)
        tasks.append(result.to_dict())
        rows.append({"set": name, "images": result.count, "IoU": result.iou, "BIoU": result.biou,
                     "routing acc": result.routing_accuracy, "OOD rejected": None})
    ood_out: list[dict[str, Any]] = []
    for path in ood:
        samples = load_images(path)
        rate, routes = rejection_rate(model, session.cache.embeddings(samples, desc=f"embedding {Path(path).name}"))
        ood_out.append({"path": str(path), "count": len(samples), "rejection_rate": rate,
                        "routes": {r: routes.count(r) for r in sorted(set(routes))}})
        rows.append({"set": f"OOD {Path(path).name}", "images": len(samples), "IoU": None, "BIoU": None,
                     "routing acc": None, "OOD rejected": rate})
    table = format_table(rows, ["set", "images", "IoU", "BIoU", "routing acc", "OOD rejected"])
    return {"bundle": str(bundle.root), "task_order": bundle.task_names, "tasks": tasks, "ood": ood_out, "table": table}


def _matrix_csv(matrix: list[list[Optional[float]]], names: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task \\ after stage"] + [f"{t + 1}:{n}" for t, n in enumerate(names)])
    for k, row in enumerate(matrix):
        writer.writerow([names[k]] + ["" if v is None else f"{v:.6f}" for v in row])
    return buffer.getvalue()


def _plot(per_stage: dict[str, list[float]], names: Sequence[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    stages = np.arange(1, len(names) + 1)
    for label, values in per_stage.items():
        ax.plot(stages, np.asarray(values) * 100, marker="o", label=label)
    ax.set_xticks(stages)
    ax.set_xticklabels([f"{t}\n{n}" for t, n in zip(stages, names)], fontsize=8)
    ax.set_xlabel("stage (tasks trained)")
    ax.set_ylabel("score on seen tasks (%)")
    ax.set_title("CA-SAM continual protocol")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def run_sequence(
    bundle_dir: PathLike,
    tasks: Sequence[tuple[str, str]],
    out: PathLike,
    *,
    sam: str = "vit_b",
    checkpoint: Optional[PathLike] = None,
    config: TrainConfig = TrainConfig(),
    resize: Optional[str] = None,
    device: str = "auto",
    cache_dir: Optional[PathLike] = None,
    quiet: bool = False,
    frozen_sam: Optional[FrozenSam] = None,
) -> dict[str, Any]:
    """Train ``tasks`` in order; after stage t score tasks 1..t with the routed model of tasks 1..t.

    Tasks already in the bundle (e.g. from an interrupted sequence) are not retrained.
    """
    names = [n for n, _ in tasks]
    if len(set(names)) != len(names):
        from runtime.errors import InputError

        raise InputError(f"task names must be distinct, got {', '.join(names)}")
    fs = frozen_sam if frozen_sam is not None else load_frozen_sam(sam, Path(checkpoint) if checkpoint else None)
    n_tasks = len(tasks)
    iou: list[list[Optional[float]]] = [[None] * n_tasks for _ in range(n_tasks)]
    biou: list[list[Optional[float]]] = [[None] * n_tasks for _ in range(n_tasks)]
    trained: list[str] = []
    datasets: list[Dataset] = []
    summaries: list[dict[str, Any]] = []
    for t, (name, path) in enumerate(tasks):
        if not (Path(bundle_dir) / "bundle.json").exists() or name not in Bundle.open(bundle_dir, verify=False).task_names:
            summaries.append(train_task(bundle_dir, name, path, sam=sam, checkpoint=checkpoint, config=config,
                                        resize=resize, device=device, cache_dir=cache_dir, quiet=quiet, frozen_sam=fs))
            trained.append(name)
        bundle = Bundle.open(bundle_dir)
        datasets.append(task_test_set(bundle, name, path))
        session = open_bundle_session(bundle, checkpoint, device, cache_dir, quiet, fs)
        model = build_model(bundle, fs.model, names[: t + 1]).to(session.device)
        for k in range(t + 1):
            result = _evaluate_task(session, bundle, model, names[k], datasets[k], quiet)
            iou[k][t], biou[k][t] = result.iou, result.biou
    sizes = [len(d.test) for d in datasets]
    fill = lambda m: [[np.nan if v is None else v for v in row] for row in m]  # noqa: E731
    iou_metrics = continual_metrics(fill(iou), sizes)
    biou_metrics = continual_metrics(fill(biou), sizes)
    out_dir = Path(out)
    atomic_write_text(out_dir / "iou_matrix.csv", _matrix_csv(iou, names))
    atomic_write_text(out_dir / "biou_matrix.csv", _matrix_csv(biou, names))
    atomic_write_bytes(out_dir / "iou_plot.png", _plot({"IoU_t": iou_metrics["per_stage"], "BIoU_t": biou_metrics["per_stage"]}, names))
    report = {"bundle": str(bundle_dir), "tasks": names, "test_sizes": sizes, "trained": trained,
              "iou_matrix": iou, "biou_matrix": biou, "iou": iou_metrics, "biou": biou_metrics,
              "files": ["iou_matrix.csv", "biou_matrix.csv", "sequence.json", "iou_plot.png"]}
    atomic_write_json(out_dir / "sequence.json", report)
    report["training"] = summaries
    return report
