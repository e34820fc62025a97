"""Quantise an fp32 export's encoder with the exporter's own int8 step, without re-tracing.

``casam-export --int8`` traces the model again (minutes for vit_b on two cores); to measure
the int8 encoder against an fp32 one already exported, this applies the same
``casam_export.quantize.quantize_model`` (static QDQ, per-channel weights, attention
products left fp32) to its encoder.onnx, calibrated on the images of a folder, and prints
the output error on held-out images of the same folder. The result times with
bench/cpu_peak.py (``--engines LABEL=FILE``).

    .venv/bin/python bench/quantize_encoder.py --engines DIR --calibration DIR --out int8.onnx [--count 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from casam_export.quantize import _session, quantize_model  # noqa: E402
from common import Table, add_results_option, start, write_record  # noqa: E402
from casam_export.parity import image_paths  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.preprocess import preprocess  # noqa: E402


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4, help="calibration images; the next 2 are held out")
    parser.add_argument("--out", type=Path, required=True)
    add_results_option(parser)
    args = parser.parse_args(argv)
    run = start("quantize_encoder", argv)
    manifest = Manifest.load(args.engines, verify=False)
    files = image_paths(args.calibration, "--calibration")
    prep = manifest.preprocessing  # its recorded intensity too: the grey levels the deployment feeds the encoder
    feeds = [{"image": preprocess(prep.read(p)[0], prep)[0]} for p in files[: args.count + 2]]
    fp32 = onnx.load(str(manifest.graphs["encoder"].path))
    int8 = quantize_model(fp32, feeds[: args.count])
    onnx.save_model(int8, str(args.out))
    a, b = _session(fp32), _session(int8)
    table = Table.of("held-out image", ("max |int8 − fp32| / max |fp32|", "{:.4f}"), ("cosine", "{:.5f}"))
    for path, feed in zip(files[args.count: args.count + 2], feeds[args.count:]):
        ea, eb = a.run(None, feed)[0], b.run(None, feed)[0]
        cos = float((ea * eb).sum() / np.linalg.norm(ea) / np.linalg.norm(eb))
        table.add(Path(path).name, float(np.abs(ea - eb).max() / np.abs(ea).max()), cos)
    setup = (f"The exporter's int8 step applied to {manifest.graphs['encoder'].path.name}, calibrated on "
             f"{args.count} images of the folder; embedding error on the next two. Written to {args.out.name}.")
    write_record(run, {"error": table}, setup=setup, folder=args.results_dir)


if __name__ == "__main__":
    main()
