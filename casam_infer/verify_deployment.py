"""``casam-infer --verify-deployment DIR``: re-run an int8 export's verification set here.

The runtime runs the set by itself the first time it opens an int8 export on a CPU of
another int8 kernel class (runtime/deployment.py); this command runs it on demand, on any
CPU, and prints what it found: routes, score margins, mask IoU per image label (each
task's held-out images, ``unknown`` site images) and the verdict per int8 graph. Exit 0
when every graph passes, 2 (one error line) when one fails or the export ships no set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import click

from casam_core.errors import ManifestError
from runtime.backends import open_backend
from runtime.deployment import Report, verify
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline


def verify_deployment(engines: Path, backend: str = "auto") -> Report:
    """The verification set of the export in ``engines`` through its int8 chain on this machine."""
    manifest = Manifest.load(engines)
    return verify(manifest, lambda m: Pipeline(m, open_backend(backend, m)), backend)


def format_table(report: Report) -> str:
    """The report as a few lines of text: context, per-label IoU, per-graph verdict."""
    lines = [f"CPU int8 kernel class {report.cpu_class} (export verified on {report.exported_class}), "
             f"backend {report.backend}, {report.images} images",
             f"routes {'identical' if report.routes_identical else 'differ'}; score margin failures "
             f"{len(report.margin_failures)}; mask IoU mean {report.mask_iou_mean:.4f} min {report.mask_iou_min:.4f}",
             "", f"{'images of':<24} {'n':>3} {'IoU mean':>9} {'IoU min':>8}"]
    lines += [f"{label:<24} {v['images']:>3} {v['iou_mean']:>9.4f} {v['iou_min']:>8.4f}"
              for label, v in sorted(report.per_label.items())]
    lines += ["", f"{'int8 graph':<24} {'masks':>5} {'IoU mean':>9}  verdict"]
    for key, g in report.graphs.items():
        mean = "-" if g["iou_mean"] is None else f"{g['iou_mean']:.4f}"
        verdict = "pass" if g["passed"] else "FAIL: " + "; ".join(g["failures"][:3])
        lines.append(f"{key:<24} {g['masks']:>5} {mean:>9}  {verdict}")
    return "\n".join(lines)


def run_option(ctx: click.Context, param: Any, value: Optional[Path]) -> None:
    """The eager ``--verify-deployment DIR`` option of casam-infer: print the table, exit."""
    if value is None or ctx.resilient_parsing:
        return
    report = verify_deployment(value, os.environ.get("CASAM_BACKEND", "auto"))
    click.echo(format_table(report))
    if not report.passed:  # casam-infer's error frame prints it as its one line, exit 2
        raise ManifestError(f"int8 graph(s) {', '.join(report.affected)} fail the verification set on this CPU; "
                            "the runtime runs their fp32 copies where the export ships them, else refuses it")
    ctx.exit(0)
