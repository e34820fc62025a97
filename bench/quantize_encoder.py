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

from casam_export.quantize import _session, quantize_model  # noqa: E402
from casam_export.parity import image_paths  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.preprocess import preprocess  # noqa: E402


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4, help="calibration images; the next 2 are held out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.engines, verify=False)
    files = image_paths(args.calibration, "--calibration")
    prep = manifest.preprocessing  # its recorded intensity too: the grey levels the deployment feeds the encoder
    feeds = [{"image": preprocess(prep.read(p)[0], prep)[0]} for p in files[: args.count + 2]]
    fp32 = onnx.load(str(manifest.graphs["encoder"].path))
    int8 = quantize_model(fp32, feeds[: args.count])
    onnx.save_model(int8, str(args.out))
    a, b = _session(fp32), _session(int8)
    for feed in feeds[args.count:]:
        ea, eb = a.run(None, feed)[0], b.run(None, feed)[0]
        cos = float((ea * eb).sum() / np.linalg.norm(ea) / np.linalg.norm(eb))
        print(f"held-out image: max |int8 - fp32| / max |fp32| = {np.abs(ea - eb).max() / np.abs(ea).max():.4f}, cosine {cos:.5f}")
    print(args.out)


if __name__ == "__main__":
    main()
