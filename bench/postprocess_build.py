"""Building the postprocessing maps for a new image size: dense products against two taps.

``runtime.postprocess`` folds upscale → crop → resize into one row and one column map per
image size, cached, so a folder of many sizes pays the build once per size. The build was
the dense product of the resize matrix and the upscale matrix; it is now the resize step's
two taps per row applied to the upscale matrix (``postprocess._then``). Both are timed here
side by side, in turns, for common sizes of ../shared/data/real, and the resulting
float32 maps are compared bit for bit.

    .venv/bin/python bench/postprocess_build.py [--runs 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from runtime.postprocess import _then, bilinear_matrix, bilinear_taps  # noqa: E402
from runtime.preprocess import Preprocessing, frame_for  # noqa: E402

#: (height, width): the five most common sizes in ../shared/data/real, and a 1080p frame.
SIZES = ((224, 224), (288, 384), (1000, 1000), (576, 767), (512, 512), (1080, 1920))
LOW = 256  # the decoder's low-resolution mask side


def old_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The dense resize matrix as the runtime built it before (kept here as the reference):
    the same float32 source positions, scattered into an out×in float64 matrix."""
    i0, i1, _, _ = bilinear_taps.__wrapped__(in_size, out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    frac = (src - i0.astype(np.float32)).astype(np.float64)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m.astype(np.float32)


def dense(h: int, w: int, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The two folded maps as the runtime built them before: a new size's resize matrices,
    then dense products with the (shared, cached) upscale matrix."""
    frame = frame_for(h, w, prep)
    (rh, rw), (oh, ow) = frame.resized_hw, frame.original_hw
    left = old_resize_matrix(rh, oh).astype(np.float64) @ bilinear_matrix(LOW, frame.size)[:rh]
    right = old_resize_matrix(rw, ow).astype(np.float64) @ bilinear_matrix(LOW, frame.size)[:rw]
    return left.astype(np.float32), right.astype(np.float32)


def taps(h: int, w: int, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The same maps as the runtime builds them now (runtime/postprocess.py): a new size's
    resize taps (uncached here, as for a new size), applied to the upscale matrix."""
    frame = frame_for(h, w, prep)
    (rh, rw), (oh, ow) = frame.resized_hw, frame.original_hw
    left = _then(bilinear_taps.__wrapped__(rh, oh), bilinear_matrix(LOW, frame.size)[:rh].astype(np.float64))
    right = _then(bilinear_taps.__wrapped__(rw, ow), bilinear_matrix(LOW, frame.size)[:rw].astype(np.float64))
    return left.astype(np.float32), right.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    add_results_option(parser)
    args = parser.parse_args()
    run = start("postprocess_build")
    prep = Preprocessing()
    table = Table.of("image h×w", ("dense products ms", "{:.1f}"), ("two taps ms", "{:.1f}"), ("speed-up", "{:.1f}×"),
                     "maps bit-identical")
    for h, w in SIZES:
        same = all(np.array_equal(a, b) for a, b in zip(dense(h, w, prep), taps(h, w, prep)))
        times: dict[str, list[float]] = {"dense": [], "taps": []}
        for _ in range(args.runs):
            for name, fn in (("dense", dense), ("taps", taps)):
                t0 = time.perf_counter()
                fn(h, w, prep)
                times[name].append((time.perf_counter() - t0) * 1000.0)
        d, t = statistics.median(times["dense"]), statistics.median(times["taps"])
        table.add(f"{h}×{w}", d, t, d / t, "yes" if same else "NO")
    setup = (f"Building the postprocessing maps for a new image size. The two builds take turns, {args.runs} runs "
             "each; each builds a new size's resize step from scratch, and both share the cached upscale matrix "
             "(one per model frame), as in the runtime. Cutting the maps into blocks (Band.from_dense) follows in "
             "both and is not timed. Medians in ms.")
    write_record(run, {"build": table}, setup=setup, folder=args.results_dir)

if __name__ == "__main__":
    main()
