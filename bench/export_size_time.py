"""Export time and file sizes, fp32 and fp16, for the tiny SAM (and vit_b with random weights).

Bundles hold two seeded, untrained tasks (tests/conftest.py::make_random_bundle); vit_b
gets random weights saved as a checkpoint, so no download is needed and sizes are exact.
Times are wall-clock for a full export without verification, then an incremental
re-export after a third task is added (align graph + router only), then verification alone.

    .venv/bin/python bench/export_size_time.py [--models tiny,vit_b] [--results-dir bench/results]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from conftest import make_random_bundle  # noqa: E402

from casam_export import export_bundle  # noqa: E402
from casam_core.files import atomic_path, sha256_file  # noqa: E402
from casam_bundle import Bundle  # noqa: E402

NAMES = ("alpha", "beta")


def make_bundle(work: Path, model: str) -> tuple[Bundle, Path | None, Bundle]:
    """(2-task bundle, checkpoint or None, donor bundle holding a third task 'gamma')."""
    donor = make_random_bundle(work / "donor", (*NAMES, "gamma"))
    if model == "tiny":
        return make_random_bundle(work / "bundle", NAMES), None, donor
    import torch
    from safetensors.torch import save_file

    from models.sam_loader import build_sam_architecture

    torch.manual_seed(0)
    sam = build_sam_architecture(model)
    ckpt = work / f"{model}-random.safetensors"
    with atomic_path(ckpt) as tmp:
        save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(tmp))
    from models.sam_loader import sam_preprocessing  # the variant's input (512² for EfficientViT-SAM)

    bundle = Bundle.create(work / "bundle", model, sha256_file(ckpt), sam_preprocessing(model))
    for name in NAMES:
        add_task(bundle, donor, name)
    return bundle, ckpt, donor


def add_task(bundle: Bundle, donor: Bundle, name: str) -> None:
    staged = bundle.staging_dir(name)
    shutil.copytree(donor.task_dir(name), staged)
    bundle.commit_task(donor.task(name), staged)


def sizes(out: Path, manifest: dict) -> dict[str, float]:
    mb = lambda rel: (out / rel).stat().st_size / 1e6  # noqa: E731
    result = {k: mb(g["file"]) + (mb(g["external_data"]["file"]) if g["external_data"] else 0.0)
              for k, g in manifest["graphs"].items()}
    result["align (each)"] = mb(manifest["tasks"][0]["align"]["file"])
    return result


def bench(model: str, work: Path) -> list[dict]:
    rows = []
    bundle, ckpt, donor = make_bundle(work, model)
    for fp16 in (False, True):
        precision = "fp16" if fp16 else "fp32"
        out = work / f"out-{precision}"
        t0 = time.perf_counter()
        manifest = export_bundle(bundle.root, out, fp16=fp16, verify=False, checkpoint=ckpt)
        full = time.perf_counter() - t0
        row = {"model": model, "precision": precision, "export_s": full, "sizes": sizes(out, manifest)}
        t0 = time.perf_counter()
        manifest = export_bundle(bundle.root, out, fp16=fp16, verify=True, checkpoint=ckpt)
        row["verify_s"] = time.perf_counter() - t0
        row["mask_iou_mean"] = manifest["parity"][precision]["mask_iou_mean"]
        rows.append(row)
        print(row, flush=True)
    inc = Bundle.open(shutil.copytree(bundle.root, work / "bundle-inc"))
    add_task(inc, donor, "gamma")
    out = work / "out-fp32"
    t0 = time.perf_counter()
    export_bundle(inc.root, out, verify=False, checkpoint=ckpt)
    rows[0]["incremental_s"] = time.perf_counter() - t0
    return rows


def table(rows: list[dict]) -> Table:
    keys = list(rows[0]["sizes"])
    out = Table.of("model", "precision", ("full export (s)", "{:.1f}"), ("re-export after adding a task (s)", "{:.1f}"),
                   ("verification (s)", "{:.1f}"), ("mean mask IoU vs PyTorch", "{:.5f}"),
                   *[(f"{k} (MB)", "{:.2f}") for k in keys])
    for r in rows:
        out.add(r["model"], r["precision"], r["export_s"], r.get("incremental_s"), r["verify_s"], r["mask_iou_mean"],
                *[r["sizes"][k] for k in keys])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_b")
    add_results_option(parser)
    args = parser.parse_args()
    run = start("export_size_time")
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench(model, Path(tmp))
    setup = ("Export time and file sizes: torch.onnx dynamo exporter, opset 18, onnxruntime CPU for verification. "
             "Random weights (sizes are exact; times are wall-clock, single run). Re-export after adding a task "
             "rebuilds only the new align graph and the router; the encoder and decoder files are kept "
             "byte-identical. The router is kept fp32 under --fp16.")
    write_record(run, {"exports": table(rows)}, setup=setup, folder=args.results_dir)

if __name__ == "__main__":
    main()
