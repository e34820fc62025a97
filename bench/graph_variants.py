"""Each export-time rewrite against SAM's own form, on the same inputs, in onnxruntime CPU.

Rows, each an A/B with the two variants taking turns after a warm-up:
  1. decoder: SAM's graph (``PromptDecoder``) vs the lean decoder
     (casam_export/lean_decoder.py), 8 boxes in one call and in eight calls;
  2. preprocessing: float arithmetic vs the lookup table, one 768×1024 RGB image.
Both decoders are exported here from the same seeded tiny SAM with random weights (the
decoder is the same size for every SAM), so the comparison is of graph structure alone.
(The encoder's lean global attention is a memory bound, not a speed-up: SAM's own form
holds a heads×4096×4096 map; see casam_export/lean_attention.py.)

    .venv/bin/python bench/graph_variants.py [--runs 15] [--results-dir bench/results]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from casam_export.graphs import DECODER  # noqa: E402
from casam_export.lean_decoder import LeanPromptDecoder  # noqa: E402
from common import Table, add_results_option, start, write_record  # noqa: E402
from infer_latency import export_fp32_graph, inputs, interleaved  # noqa: E402
from models.prompt_decoder import PromptDecoder  # noqa: E402
from models.sam_loader import load_frozen_sam  # noqa: E402
from runtime.backends import OrtBackend  # noqa: E402
from runtime.preprocess import Preprocessing, frame_for, preprocess, resize_rgb, to_rgb_255  # noqa: E402
from runtime.prompts import encode_prompts  # noqa: E402


def float_preprocess(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The arithmetic the lookup table replaces: (resized - mean) / std in float32, zero-padded."""
    rgb = to_rgb_255(image, prep.intensity)
    frame = frame_for(*rgb.shape[:2], prep)
    rh, rw = frame.resized_hw
    resized = resize_rgb(rgb, frame.resized_hw)
    normalised = (resized.astype(np.float32) - np.float32(prep.mean)) / np.float32(prep.std)
    out = np.zeros((1, 3, prep.size, prep.size), np.float32)
    out[0, :, :rh, :rw] = normalised.transpose(2, 0, 1)
    return out


def medians(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    return {k: statistics.median(ms for _, ms in v) for k, v in interleaved(fns, runs).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per row")
    add_results_option(parser)
    args = parser.parse_args()
    run = start("graph_variants")
    logging.getLogger("casam").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="casam_graph_variants_"))
    sam = load_frozen_sam("tiny").model
    backend = OrtBackend("ort-cpu")
    rows: list[tuple[str, str, float, float]] = []

    print("decoder…", flush=True)
    sam_dec = backend.load("sam", export_fp32_graph(PromptDecoder(sam), DECODER, work, "decoder_sam.onnx"))
    lean_dec = backend.load("lean", export_fp32_graph(LeanPromptDecoder(sam), DECODER, work, "decoder_lean.onnx"))
    emb = np.random.default_rng(0).normal(size=(1, 256, 64, 64)).astype(np.float32)
    _, boxes = inputs()
    coords, labels = encode_prompts(boxes)  # the 768×1024 image is already at the model scale
    feeds = lambda s: {"embeddings": emb, "point_coords": coords[s], "point_labels": labels[s]}  # noqa: E731
    for what, slices in (("8 boxes, one call", [slice(0, 8)]), ("8 boxes, 8 calls", [slice(i, i + 1) for i in range(8)])):
        m = medians({"sam": lambda: [sam_dec.run(feeds(s)) for s in slices],
                     "lean": lambda: [lean_dec.run(feeds(s)) for s in slices]}, args.runs)
        rows.append((f"decoder, {what}", "SAM's graph → lean decoder", m["sam"], m["lean"]))

    print("preprocessing…", flush=True)
    rgb, _ = inputs()
    prep = Preprocessing()
    assert np.array_equal(float_preprocess(rgb, prep), preprocess(rgb, prep)[0])
    m = medians({"sam": lambda: float_preprocess(rgb, prep), "lean": lambda: preprocess(rgb, prep)}, max(args.runs, 20))
    rows.append(("preprocess, 768×1024 RGB", "float arithmetic → lookup table (bit-identical)", m["sam"], m["lean"]))

    table = Table.of("what", "variants", ("before ms", "{:.1f}"), ("after ms", "{:.1f}"), ("speed-up", "{:.2f}×"))
    for what, variants, a, b in rows:
        table.add(what, variants, a, b, a / b)
    setup = (f"Export-time rewrites against SAM's own form: onnxruntime, the runtime's CPU session settings, fp32, "
             f"random weights. Medians of {args.runs} runs (at least 20 for preprocessing), the two variants taking "
             "turns after a warm-up.")
    write_record(run, {"variants": table}, setup=setup, folder=args.results_dir)

if __name__ == "__main__":
    main()
