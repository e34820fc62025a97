"""int8 against fp32 exports of one bundle, side by side in one run (onnxruntime CPU):

  1. end to end (``Pipeline.predict``, one 768×1024 image, one box, route forced to a task so
     the alignment layer runs), per stage, the two exports taking turns;
  2. mask IoU of int8 against fp32 on real images (../shared/data/real, used in place), one
     box per image taken from its ground-truth mask (the bounding box of its foreground),
     and whether the routes agree;
  3. peak RSS of one ``casam-infer`` process on each export.

    .venv/bin/python bench/int8_speed.py --fp32 DIR --int8 DIR [--runs 5] [--real 6] [--label vit_b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from infer_latency import inputs, interleaved, peak_rss_mb  # noqa: E402

from runtime.pipeline import STAGES, Pipeline  # noqa: E402
from runtime.preprocess import Preprocessing  # noqa: E402
from runtime.prompts import Prompts  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"


def real_cases(count: int, prep: Preprocessing) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, 1×4 box from its mask) for ``count`` images spread over the datasets,
    each prepared with the exports' recorded intensity (``prep``), as casam-infer prepares it."""
    folders = sorted(p for p in REAL.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir()) if REAL.is_dir() else []
    cases = []
    for i in range(count):
        if not folders:
            break
        folder = folders[i % len(folders)]
        images = sorted((folder / "images").iterdir())
        image_path = images[(i // len(folders)) * 7 % len(images)]
        masks = [m for m in (folder / "masks").iterdir() if m.stem == image_path.stem]
        if not masks:
            continue
        fg = np.asarray(Image.open(masks[0])) > 0
        fg = fg if fg.ndim == 2 else fg.any(axis=2)
        if not fg.any():
            continue
        ys, xs = np.nonzero(fg)
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
        cases.append((f"{folder.name}/{image_path.name}", prep.read(image_path)[0], box))
    return cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def precisions(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    graphs = dict(manifest["graphs"])
    graphs.update({f"align/{t['name']}": t["align"] for t in manifest["tasks"]})
    return ", ".join(f"{k} {v['precision']}" for k, v in graphs.items())


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--int8", type=Path, default=None)
    parser.add_argument("--ports", action="store_true",
                        help="measure the quantisation variants instead (bench/int8_ports.py)")
    parser.add_argument("--label", default="tiny")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--real", type=int, default=6, help="real images for the mask IoU (0: skip)")
    parser.add_argument("--rss", action="store_true", help="also measure casam-infer's peak RSS on each export")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if args.ports:
        from int8_ports import ports

        return ports(args.fp32, args.label, args.runs, max(args.real, 16), getattr(args, "results_dir", None))
    if args.int8 is None:
        parser.error("--int8 DIR is required (or --ports)")
    run = start(f"int8_speed_{args.label}", argv)
    pipes = {"fp32": Pipeline.from_manifest(args.fp32, backend="ort-cpu"),
             "int8": Pipeline.from_manifest(args.int8, backend="ort-cpu")}
    task = pipes["fp32"].task_names[0]
    image, boxes = inputs()
    rows = interleaved({k: (lambda p=p: p.predict(image, Prompts.for_image(image.shape, boxes=boxes[:1]), task=task).timings_ms) for k, p in pipes.items()},
                       args.runs)
    stages = {k: {s: statistics.median(t[s] for t, _ in v) for s in STAGES} for k, v in rows.items()}
    ious: list[tuple[str, float, bool]] = []
    for name, real_image, box in real_cases(args.real, pipes["fp32"].preprocessing):
        prompts = Prompts.for_image(real_image.shape, boxes=box)
        a, b = pipes["fp32"].predict(real_image, prompts), pipes["int8"].predict(real_image, prompts)
        ious.append((name, iou(a.masks[0], b.masks[0]), a.route == b.route))
        print(f"  {name}: IoU {ious[-1][1]:.4f}, routes {'agree' if ious[-1][2] else 'differ'}", flush=True)
    rss = {}
    if args.rss:
        for k, folder in (("fp32", args.fp32), ("int8", args.int8)):
            work = Path(f"/tmp/casam_int8_rss_{k}")
            work.mkdir(exist_ok=True)
            rss[k] = peak_rss_mb(folder, work)
    write_record(run, tables(stages, ious, rss),
                 setup=(f"int8 against fp32, {args.label}, onnxruntime CPU. Medians of {args.runs} turns, ms. One "
                        f"768×1024 image, one box, route forced to a task. int8 export: {precisions(args.int8)}. "
                        "Mask IoU: real images (../shared/data/real), one box from each ground-truth mask, routed."),
                 folder=args.results_dir)


def tables(stages: dict[str, dict[str, float]], ious: list[tuple[str, float, bool]], rss: dict[str, float]) -> dict[str, Table]:
    """Per-stage times, mask IoU per image and in summary, and peak RSS, as record tables."""
    out = {"stages": Table.of("stage", ("fp32 ms", "{:.1f}"), ("int8 ms", "{:.1f}"), ("fp32 / int8", "{:.2f}×"))}
    for s in STAGES:
        f, q = stages["fp32"][s], stages["int8"][s]
        out["stages"].add("**end to end**" if s == "total" else s, f, q, f / q)
    if ious:
        out["iou"] = Table.of("image", ("IoU", "{:.4f}"), "routes")
        for n, v, same in ious:
            out["iou"].add(n, v, "same" if same else "differ")
        out["iou_summary"] = Table.of(("images", "{:d}"), ("mean IoU", "{:.4f}"), ("min IoU", "{:.4f}"),
                                      ("routes agree", "{:d}"))
        out["iou_summary"].add(len(ious), float(np.mean([x[1] for x in ious])), min(x[1] for x in ious),
                               sum(x[2] for x in ious))
    if rss:
        out["rss"] = Table.of("export", ("casam-infer peak RSS MB", "{:.0f}"))
        for k, v in rss.items():
            out["rss"].add(k, v)
    return out

if __name__ == "__main__":
    main()
