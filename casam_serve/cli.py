"""``casam-serve``: the engine chain of an export folder as a Triton Inference Server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from runtime.backends import BACKENDS
from casam_core.cli_frame import CasamCommand


@click.command(name="casam-serve", cls=CasamCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="export folder written by casam-export (holds manifest.json)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; 0.0.0.0 for every interface (e.g. inside a container)")
@click.option("--http-port", default=8000, show_default=True, help="Triton HTTP/REST port")
@click.option("--grpc-port", default=8001, show_default=True, help="Triton gRPC port")
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics port (/metrics)")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="most concurrent images that share one encoder run")
@click.option("--instances", default=None, type=click.IntRange(min=1),
              help="requests handled at once (Triton model instances)  [default: --max-batch]")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="inference backend for the engines")
@click.option("--max-resident", default=8, show_default=True, type=click.IntRange(min=1),
              help="task alignment engines kept loaded at once")
@click.option("--exit-timeout", default=3, show_default=True, type=click.IntRange(min=0),
              help="seconds Triton waits for open connections and in-flight requests when stopping")
@click.option("--verbose", is_flag=True, help="also log PyTriton's and Triton's own messages")
def main(engines: Path, backend: str, max_resident: int, verbose: bool, **network: Any) -> None:
    """Serve the CA-SAM engines in ENGINES through NVIDIA Triton Inference Server.

    The model is called `casam` (schema: docs/SERVING.md). It answers over HTTP and gRPC
    until SIGINT (Ctrl-C) or SIGTERM; `casam-infer ... --server http://HOST:PORT` is its
    client. Needs the serve extra: pip install 'casam[serve]'.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("pytriton").setLevel(logging.WARNING)
    from runtime.pipeline import Pipeline
    from casam_serve.server import ServeConfig, serve

    config = ServeConfig(host=network["host"], http_port=network["http_port"], grpc_port=network["grpc_port"],
                         metrics_port=network["metrics_port"], max_batch=network["max_batch"],
                         instances=network["instances"] or network["max_batch"], exit_timeout_s=network["exit_timeout"])
    pipeline = Pipeline.from_manifest(engines, backend=backend, max_resident=max_resident, preload=True)
    serve(pipeline, config)


if __name__ == "__main__":
    main()
