"""report.html of the continual protocol: one self-contained page, figures embedded as PNG.

Everything on the page is drawn from the ``sequence.json`` content it is given, so the
page and the JSON can never disagree. Figures are matplotlib PNGs inlined as
``data:image/png;base64`` and the page has no scripts or external links: it opens from
disk in any browser, can be mailed, and shows the same thing years later. Every string
from the run (task names, paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from importlib import resources
from string import Template
from typing import Any, Optional, Sequence

import numpy as np

TEMPLATE = "report_template.html"
METRICS = (("last", "Last"), ("avg", "Avg"), ("ff", "FF"))


def percent(value: Optional[float]) -> str:
    """A fraction as the page shows it (two decimals of a percentage); '–' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _label(report: dict[str, Any], method: str) -> str:
    return report["results"][method].get("label", method)


# ---- figures ----------------------------------------------------------------------


def heatmap_figure(report: dict[str, Any]) -> str:
    plt = _pyplot()
    names, methods = report["tasks"], report["methods"]
    n = len(names)
    # About 0.5 inch per cell plus room for the task names, so the page (~1200 px) shows
    # three methods side by side with readable numbers.
    fig, axes = plt.subplots(1, len(methods), figsize=(len(methods) * (1.8 + 0.5 * n), 1.3 + 0.5 * n), squeeze=False)
    for ax, m in zip(axes[0], methods):
        matrix = np.array([[np.nan if v is None else 100 * v for v in row] for row in report["results"][m]["iou_matrix"]])
        ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis")
        for k in range(n):
            for t in range(n):
                if not np.isnan(matrix[k, t]):
                    ax.text(t, k, f"{matrix[k, t]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if matrix[k, t] < 60 else "black")
        ax.set_title(_label(report, m), fontsize=10)
        ax.set_xticks(range(n), [str(t + 1) for t in range(n)], fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        ax.set_xlabel("after stage")
    fig.tight_layout()
    return _png(fig)


def curve_figure(report: dict[str, Any]) -> str:
    plt = _pyplot()
    names, methods = report["tasks"], report["methods"]
    n = len(names)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False, sharey=True)
    stages = np.arange(1, n + 1)
    for ax, m in zip(axes[0], methods):
        matrix = report["results"][m]["iou_matrix"]
        for k, name in enumerate(names):
            ax.plot(stages[k:], [100 * v for v in matrix[k][k:]], marker="o", ms=3, label=name)
        ax.set_title(_label(report, m), fontsize=10)
        ax.set_xticks(stages)
        ax.set_xlabel("after stage")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("IoU (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def _bins(values: Sequence[float]) -> np.ndarray:
    """Log-spaced bins when all scores are positive (VAE scores span decades), else linear."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.linspace(0, 1, 11)
    lo, hi = float(v.min()), float(v.max())
    if lo > 0 and hi > lo:
        return np.geomspace(lo, hi, 30)
    return np.linspace(lo, hi if hi > lo else lo + 1, 30)


def score_figure(report: dict[str, Any]) -> str:
    plt = _pyplot()
    routing = report["routing"]
    tasks = list(routing["vae_scores"])
    ood = [r["name"] for r in report.get("ood", [])]
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        entry = routing["vae_scores"][task]
        others = [v for s, vals in entry["sets"].items() if s != task and s not in ood for v in vals]
        unseen = [v for s in ood for v in entry["sets"].get(s, [])]
        groups = [("held-out scores of its own training images (K-fold)", entry["held_out"], "tab:blue"),
                  ("its own test images", entry["sets"].get(task, []), "tab:cyan"),
                  ("other tasks' test images", others, "tab:orange"), ("unseen sets' images", unseen, "tab:red")]
        bins = _bins([v for _, vals, _ in groups for v in vals] + [entry["threshold"]])
        for label, vals, colour in groups:
            ax.hist(vals, bins=bins, alpha=0.55, color=colour, label=label)
        ax.axvline(entry["threshold"], color="black", ls="--", lw=1.2, label="threshold τ")
        if bins[0] > 0:
            ax.set_xscale("log")
        ax.set_title(f"VAE of {task} (τ = {entry['threshold']:.3g})", fontsize=10)
        ax.set_xlabel("score (lower = more like the task)", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))
    return _png(fig)


def confusion_figure(report: dict[str, Any]) -> str:
    plt = _pyplot()
    routing = report["routing"]
    counts = np.asarray(routing["confusion"], np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    r, c = counts.shape
    fig, ax = plt.subplots(figsize=(2.4 + 1.1 * c, 1.4 + 0.55 * r))
    ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(r):
        for j in range(c):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(c), routing["columns"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(r), routing["rows"], fontsize=8)
    ax.set_xlabel("routed to")
    fig.tight_layout()
    return _png(fig)


# ---- tables -----------------------------------------------------------------------


def summary_table(report: dict[str, Any]) -> str:
    """Last/Avg/FF per method, IoU and BIoU; each cell carries ``data-key`` for checking."""
    head = "".join(f"<th>{kind} {label}</th>" for kind in ("IoU", "BIoU") for _, label in METRICS)
    lines = [f'<table id="summary"><tr><th class="name">method</th>{head}</tr>']
    for m in report["methods"]:
        cells = "".join(
            f'<td data-key="{html.escape(m)}.{kind}.{key}">{percent(report["results"][m][kind][key])}</td>'
            for kind in ("iou", "biou") for key, _ in METRICS)
        lines.append(f'<tr><td class="name">{html.escape(_label(report, m))} <code>{html.escape(m)}</code></td>{cells}</tr>')
    return "\n".join(lines + ["</table>"])


def zero_shot_table(report: dict[str, Any]) -> str:
    rows = report.get("zero_shot", [])
    if not rows:
        return '<p class="note">No unseen sets were given (--ood NAME=PATH).</p>'
    methods = report["methods"]
    groups = "".join(f'<th colspan="3">{html.escape(_label(report, m))}</th>' for m in methods)
    subheads = "<th>IoU</th><th>BIoU</th><th>IoU drop</th>" * len(methods)
    lines = [f'<table id="zero-shot"><tr><th class="name" rowspan="2">set</th><th rowspan="2">images</th>{groups}'
             f'<th rowspan="2">CA-SAM rejected</th></tr><tr>{subheads}</tr>']
    for row in rows:
        cells = "".join(
            f'<td>{percent(row["methods"][m]["iou"])}</td><td>{percent(row["methods"][m]["biou"])}</td>'
            f'<td>{percent(row["methods"][m]["iou_drop"])}</td>' for m in methods)
        lines.append(f'<tr><td class="name">{html.escape(row["set"])}</td><td>{row["count"]}</td>{cells}'
                     f'<td>{percent(row.get("rejection_rate"))}</td></tr>')
    return "\n".join(lines + ["</table>"])


def render_report(report: dict[str, Any]) -> str:
    """The whole page for one ``sequence.json`` content."""
    template = Template(resources.files("trainer").joinpath(TEMPLATE).read_text(encoding="utf-8"))
    sam = report.get("sam", {})
    routing = "routing" in report
    no_casam = '<p class="note">CA-SAM was not among the methods: no routing to show.</p>'
    return template.substitute(
        task_list=html.escape(" → ".join(report["tasks"])),
        method_list=html.escape(", ".join(f"{_label(report, m)} ({m})" for m in report["methods"])),
        sam_line=html.escape(f"{sam.get('model', '?')} (checkpoint sha256 {str(sam.get('checkpoint_sha256', '?'))[:16]})"),
        untrained_warning=('<p class="warn">This SAM has random, untrained weights: absolute scores mean nothing; '
                           "only the comparisons between methods do.</p>") if sam.get("untrained") else "",
        summary_table=summary_table(report),
        heatmap_figure=heatmap_figure(report),
        curve_figure=curve_figure(report),
        reference=html.escape(report.get("reference", "sam")),
        zero_shot_table=zero_shot_table(report),
        score_figure=score_figure(report) if routing else no_casam,
        confusion_figure=confusion_figure(report) if routing else no_casam,
    )
