"""The paper's comparison on real data: CA-SAM vs naive sequential fine-tuning vs plain SAM.

Five seen tasks in a fixed order (polyp_kvasir, cxr_jsrt, skin_ph2, nuclei_monuseg,
em_isbi2012) and two unseen sets (polyp_cvc_clinicdb, ct_mr_sammed2d_demo) from
../shared/data/real, trained and scored by ``casam-train sequence``'s own code
(``trainer.sequence.run_sequence``) with methods casam, naive and sam.

    nice python bench/paper_protocol.py [--train 6] [--test 6] [--ood 6] [--epochs 2] [--sam tiny]

The images are used in place: a seeded sample of each set is *linked* (not copied) into
a work folder with a fixed split.json. With the tiny seeded SAM (random weights) the
absolute IoUs mean nothing; the comparisons between methods are what this tests. With an
official checkpoint, ``--sam vit_b --checkpoint FILE`` and larger --train/--epochs give
the paper's setting. Results: the record bench/results/paper_protocol-<date>.json (the
figures), the report bench/results/paper_protocol.md, the report's figures as
bench/results/paper_protocol_*.png, and the whole run (sequence.json, report.html,
CSVs, bundle) in --work.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from casam_core.files import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from common import Run, Table, start, write_record  # noqa: E402
from trainer.report import render_report  # noqa: E402
from trainer.sequence import run_sequence  # noqa: E402
from trainer.session import SessionOptions  # noqa: E402
from trainer.train_task import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
SEEN = ("polyp_kvasir", "cxr_jsrt", "skin_ph2", "nuclei_monuseg", "em_isbi2012")
UNSEEN = ("polyp_cvc_clinicdb", "ct_mr_sammed2d_demo")
FIGURES = ("heatmaps", "curves", "vae_scores", "confusion")  # the report's <img> order


def linked_subset(source: Path, target: Path, n_train: int, n_test: int, seed: int) -> Path:
    """A seeded sample of ``source``'s pairs, symlinked into ``target`` with a fixed split."""
    masks = {p.stem: p for p in (source / "masks").iterdir()}
    images = [p for p in sorted((source / "images").iterdir()) if p.stem in masks]
    pick = np.random.default_rng(seed).permutation(len(images))[: n_train + n_test]
    chosen = [images[i] for i in sorted(pick)]
    shutil.rmtree(target, ignore_errors=True)
    for sub in ("images", "masks"):
        (target / sub).mkdir(parents=True)
    for image in chosen:
        (target / "images" / image.name).symlink_to(image.resolve())
        (target / "masks" / masks[image.stem].name).symlink_to(masks[image.stem].resolve())
    stems = [p.stem for p in chosen]
    atomic_write_json(target / "split.json", {"train": stems[:n_train], "test": stems[n_train:]})
    return target


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def percent(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100 * v


def record_tables(report: dict) -> dict[str, Table]:
    """The run's figures (%) as record tables: summary, IoU per task and stage for each
    method, zero-shot, routing confusion."""
    res, methods, names = report["results"], report["methods"], report["tasks"]
    out = {"summary": Table.of("method", *[(f"{x} {k}", "{:.2f}") for k in ("IoU", "BIoU") for x in ("Last", "Avg", "FF")])}
    for m in methods:
        out["summary"].add(f"{res[m]['label']} ({m})", *[percent(res[m][k][x]) for k in ("iou", "biou")
                                                          for x in ("last", "avg", "ff")])
        out[f"iou_{m}"] = Table.of("task", *[(str(t + 1), "{:.2f}") for t in range(len(names))])
        for k, row in enumerate(res[m]["iou_matrix"]):
            out[f"iou_{m}"].add(names[k], *[percent(v) for v in row])
    columns = [c for m in methods for c in ((f"{res[m]['label']} IoU", "{:.2f}"), ("drop", "{:.2f}"))]
    out["zero_shot"] = Table.of("set", ("images", "{:d}"), *columns, ("CA-SAM rejected", "{:.2f}"))
    for row in report["zero_shot"]:
        cells = [percent(row["methods"][m][k]) for m in methods for k in ("iou", "iou_drop")]
        out["zero_shot"].add(row["set"], row["count"], *cells, percent(row["rejection_rate"]))
    routing = report.get("routing")
    if routing:
        out["routing"] = Table.of("set", *[(c, "{:d}") for c in routing["columns"]])
        for name, counts in zip(routing["rows"], routing["confusion"]):
            out["routing"].add(name, *counts)
    return out


def summary_markdown(report: dict, args: argparse.Namespace, seconds: float, load_before: str, load_after: str) -> str:
    tables = record_tables(report)
    lines = ["# Paper protocol (bench/paper_protocol.py)", "",
             f"SAM: {report['sam']['model']} (untrained: {report['sam']['untrained']}). CPU: {cpu_model()}, "
             f"{os.cpu_count()} cores, torch threads {args.threads}. Wall time {seconds / 60:.1f} min.",
             f"Load before: `{load_before}`; after: `{load_after}`.", "", setup_text(args), "",
             "## Last / Avg / FF (%)", "", tables["summary"].markdown(), "",
             "## IoU_{k,t} (%): row = task, column = after stage", ""]
    for m in report["methods"]:
        lines += [f"**{report['results'][m]['label']}**", "", tables[f"iou_{m}"].markdown(), ""]
    lines += ["## Zero-shot (%)", "", tables["zero_shot"].markdown()]
    if "routing" in tables:
        lines += ["", "## Routing confusion (rows: set, columns: route)", "", tables["routing"].markdown()]
    lines += ["", "## Hypotheses", ""] + [f"- {h}" for h in hypotheses(report)]
    return "\n".join(lines) + "\n"


def setup_text(args: argparse.Namespace) -> str:
    return (f"Per seen task: {args.train} train + {args.test} test images (seeded sample, seed {args.seed}); "
            f"unseen sets: up to {args.ood} images each. Epochs {args.epochs}, batch {args.batch_size}, "
            f"lr {args.lr}, masks/image {args.masks_per_image}, VAE epochs {args.vae_epochs}; "
            "images at their native size (the model frame is 1024 for every method).")


def write_results(run: Run, report: dict, args: argparse.Namespace, seconds: float, loads: list[str]) -> str:
    """The Markdown report beside the figures (bench/results/paper_protocol.md) and the record."""
    text = summary_markdown(report, args, seconds, loads[0], loads[1])
    atomic_write_text(args.results.with_suffix(".md"), text)
    notes = [f"wall time {seconds / 60:.1f} min", *[f"hypothesis: {h}" for h in hypotheses(report)]]
    write_record(run, record_tables(report), setup=setup_text(args), notes=notes, folder=args.results.parent)
    return text


def hypotheses(report: dict) -> list[str]:
    """The issue's four claims, each stated with the numbers that decide it."""
    res, out = report["results"], []
    if {"casam", "naive"} <= set(res):
        n_ff, c_ff = res["naive"]["iou"]["ff"], res["casam"]["iou"]["ff"]
        out.append(f"naive FF-IoU well above CA-SAM's: {pct(n_ff)} vs {pct(c_ff)} → {'yes' if n_ff > c_ff + 0.01 else 'NO'}")
        n_l, c_l = res["naive"]["iou"]["last"], res["casam"]["iou"]["last"]
        out.append(f"CA-SAM Last-IoU above naive's: {pct(c_l)} vs {pct(n_l)} → {'yes' if c_l > n_l else 'NO'}")
    if "casam" in res:
        out.append(f"CA-SAM FF-IoU ≤ 1 point: {pct(res['casam']['iou']['ff'])} → {'yes' if res['casam']['iou']['ff'] <= 0.01 else 'NO'}")
    for row in report["zero_shot"]:
        d = row["methods"].get("casam", {}).get("iou_drop")
        if d is not None:
            out.append(f"CA-SAM zero-shot IoU within 1 point of sam's on {row['set']}: drop {pct(d)} → {'yes' if abs(d) <= 0.01 else 'NO'}")
    return out


def save_figures(report_html: Path, prefix: Path) -> list[Path]:
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', report_html.read_text(encoding="utf-8"))
    paths = []
    for name, data in zip(FIGURES, sources):
        path = prefix.parent / f"{prefix.name}_{name}.png"
        atomic_write_bytes(path, base64.b64decode(data))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=6, help="training images per seen task")
    p.add_argument("--test", type=int, default=6, help="held-out images per seen task")
    p.add_argument("--ood", type=int, default=6, help="images per unseen set (at most)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--masks-per-image", type=int, default=1, help="every set here has one structure per image")
    p.add_argument("--vae-epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sam", default="tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--work", type=Path, default=Path("/tmp/casam_paper_protocol"), help="data links, bundle, run output")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "paper_protocol")
    p.add_argument("--summarise-only", action="store_true", help="rewrite the results from --work's finished run")
    args = p.parse_args()
    if args.summarise_only:
        from casam_core.files import read_json

        report = read_json(args.work / "out" / "sequence.json")
        seconds = float(read_json(args.work / "out" / "timing.json")["seconds"])
        loads = read_json(args.work / "out" / "timing.json")["load"]
        text = write_results(start("paper_protocol"), report, args, seconds, loads)
        atomic_write_text(args.work / "out" / "report.html", render_report(report))  # with today's report code
        save_figures(args.work / "out" / "report.html", args.results)
        print(text)
        return
    if not all((REAL / n).is_dir() for n in SEEN + UNSEEN):
        sys.exit(f"paper_protocol: {REAL} lacks some of {', '.join(SEEN + UNSEEN)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    work = args.work
    tasks = [(n, str(linked_subset(REAL / n, work / "data" / n, args.train, args.test, args.seed))) for n in SEEN]
    ood = []
    for n in UNSEEN:
        count = min(args.ood, len(list((REAL / n / "images").iterdir())))
        ood.append((n, str(linked_subset(REAL / n, work / "data" / n, count, 0, args.seed))))
    shutil.rmtree(work / "bundle", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, masks_per_image=args.masks_per_image,
                         vae_epochs=args.vae_epochs, seed=args.seed)
    run = start("paper_protocol")
    load_before = uptime()
    t0 = time.time()
    report = run_sequence(work / "bundle", tasks, work / "out", methods=["casam", "naive", "sam"], ood=ood, config=config,
                          session=SessionOptions(sam=args.sam, checkpoint=args.checkpoint, device="cpu",
                                                 cache_dir=work / "cache"))
    seconds = time.time() - t0
    load_after = uptime()
    atomic_write_json(work / "out" / "timing.json", {"seconds": seconds, "load": [load_before, load_after], "args": {
        k: str(v) for k, v in vars(args).items()}})
    text = write_results(run, report, args, seconds, [load_before, load_after])
    figures = save_figures(work / "out" / "report.html", args.results)
    print(text)
    print("figures:", ", ".join(str(f) for f in figures), "| full run:", work / "out")


if __name__ == "__main__":
    main()
