"""``casam-export``: the command-line face of ``casam_export.export_bundle``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from casam_export.manifest import graph_entries
from casam_export.parity import INT8_MASK_IOU_BAR, MASK_IOU_BARS
from casam_export.quantize import DEFAULT_CALIBRATION_COUNT
from casam_core.cli_frame import CasamCommand
from runtime.manifest import MANIFEST_NAME


@click.command(name="casam-export", cls=CasamCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle folder written by casam-train (holds bundle.json).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Export folder to write: graphs, engines, parity.json and manifest.json. Re-exporting "
                   "into the same folder rebuilds only the graphs whose inputs changed.")
@click.option("--fp16", is_flag=True,
              help="Convert the graphs to fp16 (LayerNorm, softmax and reductions stay fp32; inputs and "
                   "outputs stay fp32; the router stays fp32 so routing is unchanged).")
@click.option("--int8", is_flag=True,
              help="Quantise the encoder and the alignment layers to int8 (static QDQ, per-channel weights), "
                   "calibrated on real images; router and decoder stay fp32. A graph that misses its bar "
                   f"(routes identical to fp32, mean mask IoU ≥ {INT8_MASK_IOU_BAR}) is kept fp32, with a warning.")
@click.option("--calibration", "calibration", type=click.Path(path_type=Path), default=None,
              help="Folder of calibration images for --int8 (pictures, DICOM, NIfTI: a volume gives its middle "
                   "slice), read with the bundle's recorded intensity handling (default: the training images "
                   "recorded in the bundle's task splits, where they still exist).")
@click.option("--calibration-count", type=click.IntRange(min=1), default=DEFAULT_CALIBRATION_COUNT,
              show_default=True, help="Most calibration images per graph for --int8.")
@click.option("--no-fp32-fallback", is_flag=True,
              help="--int8: ship no fp32 copy of the int8 graphs; where the shipped verification set fails on "
                   "another CPU class the runtime then refuses the export instead of running those graphs in fp32.")
@click.option("--verify-count", type=click.IntRange(min=1, max=32), default=8, show_default=True,
              help="--int8: images in the shipped verification set (the tasks' held-out images, then --verify-images).")
@click.option("--trt/--no-trt", default=None,
              help="Build TensorRT engines (--trt requires TensorRT and a CUDA GPU). Default: build them "
                   "when both are present, else write ONNX only and say so in the manifest.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset of the graphs (17-23).")
@click.option("--max-boxes", "max_prompts", default=16, show_default=True, type=int,
              help="Most prompts (boxes or point sets) per decoder call; the runtime splits larger batches.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the exported chain against the PyTorch model and fail when routes differ or mask "
                   f"IoU misses the bar ({', '.join(f'{bar} {p}' for p, bar in MASK_IOU_BARS.items())}); writes "
                   "parity.json. On failure no manifest is "
                   "written (the previous export in --out stays in force) and the report goes to "
                   "parity-failed.json. --no-verify marks the manifest unverified; the runtime warns on loading it.")
@click.option("--verify-images", type=click.Path(path_type=Path), default=None,
              help="Folder of images for --verify (pictures, DICOM, NIfTI), read with the bundle's recorded "
                   "intensity handling. Added to the tasks' held-out images (their split.json test lists); "
                   "built-in synthetic images when there are neither.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="SAM checkpoint file; must have the sha256 recorded in the bundle (default: the cached "
                   "official checkpoint, or none for the tiny test model).")
@click.option("--overwrite", is_flag=True,
              help="Write into an --out folder that holds another bundle's export or other files (nothing in it is "
                   "reused).")
@click.option("--force", is_flag=True, hidden=True, help="Deprecated spelling of --overwrite.")
@click.option("--quiet", is_flag=True, help="No progress bars; print only the manifest path.")
def main(overwrite: bool, force: bool, no_fp32_fallback: bool, verify_count: int, bundle_dir: Path, out_dir: Path,
         **options: Any) -> None:
    """Export a CA-SAM bundle to separate graphs: encoder, router (the VAE scorers), one
    alignment graph per task, and decoder, described by manifest.json."""
    from casam_export.export import ExportOptions, export_bundle
    from casam_export.quantize import Int8Options

    int8 = Int8Options(fp32_fallback=not no_fp32_fallback, verify_count=verify_count)
    manifest = export_bundle(bundle_dir, out_dir, ExportOptions(force=overwrite or force, int8_options=int8, **options))
    _report(manifest, out_dir, options["quiet"])


def _report(manifest: dict[str, Any], out_dir: Path, quiet: bool) -> None:
    """What the export built, reused and verified; the manifest path last (scripts read it)."""
    if not quiet:
        reused = [k for k, v in graph_entries(manifest).items() if v.get("reused")]
        click.echo(f"exported {len(manifest['tasks'])} task(s), {manifest['precision']}; unchanged: {', '.join(reused) or 'none'}")
        if manifest["precision"] == "int8":
            graphs = graph_entries(manifest)
            click.echo("precision per graph: " + ", ".join(f"{k} {v['precision']}" for k, v in graphs.items()))
        parity = manifest["parity"]
        if parity.get("passed"):
            s = parity[manifest["precision"]]
            click.echo(f"parity: routes identical, mean mask IoU {s['mask_iou_mean']:.5f} (min {s['mask_iou_min']:.5f})")
        else:
            click.echo("parity: not verified (--no-verify); the runtime warns when it loads this export")
        if not manifest["tensorrt"]["available"]:
            click.echo(f"TensorRT: not built ({manifest['tensorrt']['reason']})")
    click.echo(str(Path(out_dir) / MANIFEST_NAME))


if __name__ == "__main__":
    main(prog_name="casam-export")
