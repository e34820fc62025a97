"""Edge encoders side by side on this CPU (issue 25): encoder GMAC, casam-infer chain time,
peak RSS and the alignment layer's share, for MobileSAM, EfficientViT-SAM and SAM's vit_b.

Full-size architectures with random weights (saved as a checkpoint, so nothing is
downloaded; the compute does not depend on the weight values), one seeded untrained task
per bundle (tests/conftest.py::make_random_bundle). Each variant is exported fp32 (and int8
for the names in --int8) and run by ``casam-infer`` in a fresh process on 1024×1024
pictures with one box, route forced to the task so the alignment layer runs: the
per-image chain is read → preprocess → encoder → router → alignment → decoder →
postprocess → mask written, onnxruntime CPU. GMAC: multiply-accumulates of the encoder's
convolutions and matrix products for one image (torch's FLOP counter / 2).

    .venv/bin/python bench/encoder_variants.py [--sam mobile_sam,efficientvit_sam_l0,vit_b] [--int8 mobile_sam]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from conftest import make_random_bundle  # noqa: E402
from infer_latency import RSS_PROBE  # noqa: E402

from casam_bundle import Bundle  # noqa: E402
from casam_core.files import atomic_path, sha256_file  # noqa: E402
from casam_export import export_bundle  # noqa: E402

IMAGES = 4  # timed pictures per chain (after one warm-up picture)
#: A 1-minute load average above this, sampled after each chain, is named in the record's
#: notes: other jobs shared the 2 cores, and the times are inflated by them.
BUSY_LOAD = 2.0


def encoder_gmac(name: str) -> float:
    """Multiply-accumulates of the encoder on one image, in G."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.sam_loader import SAM_SPECS, build_sam_architecture

    encoder = build_sam_architecture(name).image_encoder.eval()
    size = SAM_SPECS[name].image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 2e9


def make_bundle(work: Path, name: str) -> tuple[Path, Path]:
    """(bundle with one untrained task on SAM ``name``, its random-weight checkpoint)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from models.sam_loader import build_sam_architecture, sam_preprocessing

    torch.manual_seed(0)
    ckpt = work / f"{name}-random.safetensors"
    with atomic_path(ckpt) as tmp:
        save_file({k: v.contiguous() for k, v in build_sam_architecture(name).state_dict().items()}, str(tmp))
    donor = make_random_bundle(work / "donor", ("alpha",))
    bundle = Bundle.create(work / "bundle", name, sha256_file(ckpt), sam_preprocessing(name))
    staged = bundle.staging_dir("alpha")
    shutil.copytree(donor.task_dir("alpha"), staged)
    bundle.commit_task(donor.task("alpha"), staged)
    return bundle.root, ckpt


def pictures(work: Path) -> list[Path]:
    """IMAGES + 1 seeded 1024×1024 RGB pictures (the first is the warm-up)."""
    from PIL import Image

    paths = []
    for i in range(IMAGES + 1):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:1024, 0:1024]
        base = (np.sin(xx / (30 + 5 * i)) + np.cos(yy / 41)) * 50 + 128
        image = np.clip(base[..., None] + rng.normal(0, 10, (1024, 1024, 3)), 0, 255).astype(np.uint8)
        paths.append(work / f"img{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def chain(engines: Path, images: list[Path], work: Path) -> dict[str, Any]:
    """One casam-infer process over the pictures: per-stage median ms of the timed ones, peak RSS."""
    report = work / f"rss_{engines.name}.txt"
    cmd = [sys.executable, "-c", RSS_PROBE, str(report), *map(str, images), "--box", "200", "150", "800", "900",
           "--task", "alpha", "--engines", str(engines), "--backend", "ort-cpu", "--out", str(work / f"masks_{engines.name}"),
           "--json", "--quiet", "--overwrite"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")][1:]
    stages = {k: float(np.median([r["timings_ms"][k] for r in records])) for k in records[0]["timings_ms"]}
    return {"stages": stages, "rss_mb": int(report.read_text()) / 1024.0, "load": os.getloadavg()[0]}


def bench(name: str, int8: bool, work: Path, images: list[Path]) -> list[dict[str, Any]]:
    bundle, ckpt = make_bundle(work, name)
    rows = []
    for precision in ("fp32", "int8") if int8 else ("fp32",):
        out = work / precision
        # Unverified: the suite checks the chain (tests/test_edge_*.py); int8 still keeps any
        # graph that misses its own quantisation bar in fp32, which the manifest then says.
        started = time.perf_counter()
        export_bundle(bundle, out, int8=precision == "int8", verify=False, checkpoint=ckpt,
                      calibration=images[0].parent if precision == "int8" else None, calibration_count=4)
        print(f"{name} {precision}: exported in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        rows.append({"sam": name, "precision": precision, **chain(out, images, work)})
        print(f"{name} {precision}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def tables(rows: list[dict[str, Any]], gmac: dict[str, float]) -> dict[str, Table]:
    t = Table.of("variant", "precision", ("encoder GMAC", "{:.1f}"), ("chain s", "{:.3f}"), ("encoder ms", "{:.0f}"),
                 ("align ms", "{:.0f}"), ("align share", "{:.0%}"), ("peak RSS MB", "{:.0f}"), ("vs vit_b", "{:.1f}×"))
    vit_b = next((r["stages"]["total"] for r in rows if r["sam"] == "vit_b" and r["precision"] == "fp32"), None)
    for r in rows:
        s = r["stages"]
        t.add(r["sam"], r["precision"], gmac[r["sam"]], s["total"] / 1000, s["encoder"], s["align"],
              s["align"] / s["total"], r["rss_mb"], vit_b / s["total"] if vit_b else None)
    stages = Table.of("variant", "precision", *((k, "{:.0f}") for k in rows[0]["stages"]))
    for r in rows:
        stages.add(r["sam"], r["precision"], *r["stages"].values())
    return {"variants": t, "stages": stages}


SETUP = ("Full-size architectures, random weights. casam-infer in a fresh process, onnxruntime CPU, one 1024×1024 "
         f"picture with one box per image, route forced to the one task (alignment runs); median of {IMAGES} "
         "pictures after a warm-up. chain s = read → mask written per image; peak RSS = VmHWM of that process; "
         "vs vit_b = vit_b's fp32 chain time / this chain time, same run. Stage table in ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam", default="mobile_sam,efficientvit_sam_l0,vit_b")
    parser.add_argument("--int8", default="mobile_sam", help="variants also exported and timed in int8")
    add_results_option(parser)
    args = parser.parse_args()
    run = start("encoder_variants")
    names, int8 = args.sam.split(","), set(filter(None, args.int8.split(",")))
    rows, gmac = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        images = pictures(Path(tmp))
        for name in names:
            gmac[name] = encoder_gmac(name)
            work = Path(tmp) / name
            work.mkdir()
            rows += bench(name, name in int8, work, images)
    write_record(run, tables(rows, gmac), setup=SETUP, notes=busy_notes(rows), folder=args.results_dir)


def busy_notes(rows: list[dict[str, Any]]) -> list[str]:
    """A note per chain that ran while the machine was busy (1-minute load > BUSY_LOAD)."""
    return [f"{r['sam']} {r['precision']}: load average {r['load']:.1f} on 2 cores just after its chain "
            f"(above {BUSY_LOAD:g}): other jobs ran meanwhile, its times are inflated" for r in rows
            if r["load"] > BUSY_LOAD]


if __name__ == "__main__":
    main()
