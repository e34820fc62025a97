"""``casam-export``: the command-line face of ``casam_export.export_bundle``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from casam_export.manifest import graph_entries
from casam_export.quantize import DEFAULT_CALIBRATION_COUNT, INT8_MASK_IOU_BAR
from casam_export.verify import MASK_IOU_BARS
from casam_core.errors import CasamError
from runtime.manifest import MANIFEST_NAME


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--force", is_flag=True, help="Overwrite an --out folder that holds another bundle's export.")
@click.option("--quiet", is_flag=True, help="No progress bars; print only the manifest path.")
def main(bundle_dir: Path, out_dir: Path, fp16: bool, int8: bool, calibration: Optional[Path],
         calibration_count: int, trt: Optional[bool], opset: int, max_prompts: int,
         verify: bool, verify_images: Optional[Path], checkpoint: Optional[Path], force: bool, quiet: bool,
         no_fp32_fallback: bool = False, verify_count: int = 8) -> None:
    """Export a CA-SAM bundle to separate graphs: encoder, router (the VAE scorers), one
    alignment graph per task, and decoder, described by manifest.json."""
    try:
        from casam_export.export import export_bundle
        from casam_export.quantize import Int8Options

        manifest = export_bundle(bundle_dir, out_dir, fp16=fp16, int8=int8, calibration=calibration,
                                 calibration_count=calibration_count, opset=opset, max_prompts=max_prompts, verify=verify,
                                 verify_images=verify_images, trt=trt, force=force, checkpoint=checkpoint, quiet=quiet,
                                 int8_options=Int8Options(fp32_fallback=not no_fp32_fallback, verify_count=verify_count))
    except CasamError as exc:
        click.echo(f"casam-export: error: {exc}", err=True)
        sys.exit(2)
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
    main()
