"""casam-serve throughput: requests/s and latency at concurrency 1, 4 and 8, against a
plain loop of local ``Pipeline.predict`` calls on the same engines and requests.

Engines come from --engines, or are exported from the tiny random bundle
(tests/conftest.py::make_random_bundle, two untrained tasks) into a temporary folder.
Requests: 512×512 RGB images with two boxes each. The server runs in a child process
(``casam_serve.process.ServerProcess``, loopback, ephemeral ports); the client is
``runtime.remote.RemotePipeline``, one shared object, as many threads as the concurrency.

    .venv/bin/python bench/serve_throughput.py [--engines DIR] [--requests 64] [--concurrency 1,4,8]
        [--protocol http|grpc] [--backend ort-cpu] [--results-dir bench/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import Table, add_results_option, start, write_record  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.remote import RemotePipeline  # noqa: E402
from casam_serve.process import ServerProcess  # noqa: E402


def make_requests(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(4)]
    boxes = np.array([[40, 60, 300, 280], [200, 180, 480, 500]], np.float32)
    return [dict(image=images[i % len(images)], boxes=boxes) for i in range(count)]


def measure(predict: Callable[..., object], requests: list[dict], concurrency: int) -> dict[str, float]:
    """Wall-clock requests/s and per-request latency percentiles of ``requests`` over ``concurrency`` threads."""
    for request in requests[: max(2, concurrency)]:  # warm-up: sessions, connections, first allocations
        predict(**request)
    latencies: list[float] = []

    def one(request: dict) -> None:
        t0 = time.perf_counter()
        predict(**request)
        latencies.append((time.perf_counter() - t0) * 1000.0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - start
    return {"rps": len(requests) / wall, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "n": len(requests)}


def export_tiny(work: Path) -> Path:
    from conftest import make_random_bundle

    from casam_export import export_bundle

    make_random_bundle(work / "bundle")
    export_bundle(work / "bundle", work / "engines", verify=False, trt=False)
    return work / "engines"


def run(engines: Path, n: int, levels: list[int], protocol: str, backend: str) -> tuple[list[tuple], dict, dict]:
    requests = make_requests(n)
    local = Pipeline.from_manifest(engines, backend=backend)
    baseline = measure(local.predict, requests, 1)
    rows = [("local Pipeline.predict loop", 1, baseline)]
    with ServerProcess(engines, max_batch=8, backend=backend) as server:
        remote = RemotePipeline(server.http_url if protocol == "http" else server.grpc_url)
        for level in levels:
            rows.append((f"casam-serve ({protocol})", level, measure(remote.predict, requests, level)))
        info = remote.info(refresh=True)
        remote.close()
    return rows, baseline, info


def tables(rows: list[tuple], baseline: dict) -> Table:
    table = Table.of("client", ("concurrency", "{:d}"), ("requests/s", "{:.2f}"), ("p50 ms", "{:.0f}"),
                     ("p99 ms", "{:.0f}"), ("× local loop", "{:.2f}"))
    for name, level, m in rows:
        table.add(name, level, m["rps"], m["p50"], m["p99"], m["rps"] / baseline["rps"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=Path, default=None, help="casam-export folder (default: export the tiny bundle)")
    parser.add_argument("--requests", type=int, default=64, help="requests per row")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client thread counts")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--backend", default="ort-cpu", help="engine backend for both the local loop and the server")
    add_results_option(parser)
    args = parser.parse_args()
    run = start("serve_throughput")
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        engines = args.engines or export_tiny(Path(tmp))
        rows, baseline, info = run(engines, args.requests, levels, args.protocol, args.backend)
    batches = ", ".join(f"{size}: {n}" for size, n in info.get("encoder_batches", {}).items())
    setup = (f"casam-serve throughput; backend {info.get('backend', args.backend)}; tiny SAM bundle (2 untrained "
             f"tasks); {args.requests} requests per row, 512×512 RGB, 2 boxes each; server --max-batch 8 --instances 8. "
             f"Encoder runs by batch size (size: runs, warm-ups included): {batches}.")
    write_record(run, {"clients": tables(rows, baseline)}, setup=setup, folder=args.results_dir)


if __name__ == "__main__":
    main()
