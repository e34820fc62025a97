"""``export_bundle``: a bundle on disk → separate ONNX graphs (+ TensorRT engines) + manifest.

Graphs are separate so that adding a task ships only a small alignment graph and a new
router while the large encoder stays untouched: every graph records what it was built from,
and one whose inputs and file are unchanged is kept byte-for-byte. The manifest is written
last and atomically, so an interrupted export never leaves a manifest pointing at files
that are missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from casam_export.errors import ExportError, ParityError
from casam_export.lean_attention import ROWS_PER_CHUNK, lean_global_attention
from casam_export.lean_decoder import LEAN_DECODER_VERSION, LeanPromptDecoder
from casam_export.graphs import ALIGN, DECODER, ENCODER, GraphSpec, export_graph, finalize, router_spec, write_graph
from casam_export.manifest import build_manifest, claim_out_dir, graph_entries, reusable
from casam_export.tensorrt_build import build_engines, tensorrt_status
from models.sam_loader import FrozenSam, load_frozen_sam
from runtime.files import atomic_write_json
from runtime.manifest import MANIFEST_NAME
from casam_bundle import Bundle
from models.bundle_models import build_router, load_alignment

PathLike = Union[str, os.PathLike]
MAX_PROMPTS_LIMIT = 256


def load_bundle_sam(bundle: Bundle, checkpoint: Optional[PathLike]) -> FrozenSam:
    """The bundle's SAM; refused when its weights are not the ones the bundle was trained on."""
    seed = re.fullmatch(r"untrained-tiny-seed-(\d+)", bundle.checkpoint_sha256)
    kwargs = {"tiny_seed": int(seed.group(1))} if bundle.sam_model == "tiny" and seed and checkpoint is None else {}
    sam = load_frozen_sam(bundle.sam_model, checkpoint, **kwargs)
    if sam.checkpoint_sha256 != bundle.checkpoint_sha256:
        raise ExportError(
            f"SAM checkpoint {checkpoint or '(default)'} has sha256 {sam.checkpoint_sha256[:16]}…, but the bundle "
            f"was trained on {bundle.checkpoint_sha256[:16]}…; pass --checkpoint with the bundle's {bundle.sam_model} weights"
        )
    return sam


class _Job:
    """One graph to produce: where it goes, its contract, and what its bytes depend on."""

    def __init__(self, key: str, rel: str, spec: GraphSpec, make: Callable[[], nn.Module], precision: str,
                 built_from: dict[str, Any], opset: int,
                 tracing: Callable[[nn.Module], ContextManager[Any]] = lambda module: contextlib.nullcontext()) -> None:
        self.key, self.rel, self.spec, self.make, self.precision = key, rel, spec, make, precision
        self.tracing = tracing  # how the module is adjusted while it is traced
        self.built_from = {**built_from, "opset": opset, "precision": precision, "torch": torch.__version__}


def _jobs(bundle: Bundle, sam: FrozenSam, precision: str, opset: int, max_prompts: int) -> list[_Job]:
    checkpoint = {"sam_model": bundle.sam_model, "checkpoint_sha256": sam.checkpoint_sha256}
    jobs = [
        # Global attention is traced one head and one band of query rows at a time, so the
        # runtime never holds a full heads×4096×4096 map (casam_export/lean_attention.py).
        _Job("encoder", "encoder.onnx", ENCODER, lambda: sam.model.image_encoder, precision,
             {**checkpoint, "attention": f"lean-rows{ROWS_PER_CHUNK}"}, opset, tracing=lean_global_attention),
        # The image side of the decoder is computed once for all of an image's prompts
        # (casam_export/lean_decoder.py).
        _Job("decoder", "decoder.onnx", DECODER, lambda: LeanPromptDecoder(sam.model), precision,
             {**checkpoint, "max_prompts": max_prompts, "decoder": LEAN_DECODER_VERSION}, opset),
        # The router stays fp32 under --fp16: it is tiny, and fp32 scores keep routing
        # decisions identical to the PyTorch model's.
        _Job("router", "router.onnx", router_spec(len(bundle.task_names)), lambda: build_router(bundle), "fp32",
             {"tasks": [[r.name, r.files.get("vae.safetensors")] for r in bundle.tasks],
              "temperature": bundle.temperature}, opset),
    ]
    for record in bundle.tasks:
        jobs.append(_Job(f"align/{record.name}", f"align/{record.name}.onnx", ALIGN,
                         lambda name=record.name: load_alignment(bundle, name), precision,
                         {"alignment_sha256": record.files.get("alignment.safetensors"), **record.alignment}, opset))
    return jobs


def _produce(job: _Job, out: Path, opset: int, max_prompts: int) -> dict[str, Any]:
    module = job.make()
    with job.tracing(module):
        graph = export_graph(module, job.spec, opset, max_prompts)
    model = finalize(graph, fp16=job.precision == "fp16")
    written = write_graph(model, job.spec, out, job.rel)
    return {"file": written.file, "sha256": written.sha256, "precision": job.precision,
            "external_data": written.external_data, **job.spec.io_dict(), "built_from": job.built_from}


def export_bundle(
    bundle_dir: PathLike,
    out_dir: PathLike,
    *,
    fp16: bool = False,
    opset: int = 18,
    max_prompts: int = 16,
    verify: bool = True,
    verify_images: Optional[PathLike] = None,
    trt: Optional[bool] = None,
    force: bool = False,
    checkpoint: Optional[PathLike] = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Export ``bundle_dir`` into ``out_dir`` and return the manifest written there.

    ``trt``: None builds TensorRT engines where TensorRT and a GPU exist, True requires
    them, False skips them. ``verify`` runs the exported chain against the PyTorch model
    and raises ``ParityError`` (after writing parity.json and the manifest) when a bar is missed.
    """
    if not 1 <= max_prompts <= MAX_PROMPTS_LIMIT:
        raise ExportError(f"--max-boxes must be between 1 and {MAX_PROMPTS_LIMIT}, got {max_prompts}")
    if not 17 <= opset <= 23:
        raise ExportError(f"--opset must be between 17 and 23 (LayerNormalization needs 17), got {opset}")
    bundle = Bundle.open(bundle_dir)
    if not bundle.task_names:
        raise ExportError(f"bundle {bundle.root} has no tasks yet; train one with casam-train first")
    out = Path(out_dir)
    previous = claim_out_dir(out, bundle, force)
    out.mkdir(parents=True, exist_ok=True)
    sam = load_bundle_sam(bundle, checkpoint)
    precision = "fp16" if fp16 else "fp32"
    old = graph_entries(previous)
    entries: dict[str, dict[str, Any]] = {}
    jobs = _jobs(bundle, sam, precision, opset, max_prompts)
    with tqdm(jobs, desc="export", unit="graph", disable=quiet) as bar:
        for job in bar:
            bar.set_postfix_str(job.key)
            if reusable(old.get(job.key), job.built_from, out):
                entries[job.key] = {**old[job.key], "reused": True}
            else:
                entries[job.key] = {**_produce(job, out, opset, max_prompts), "reused": False}

    build_trt, reason = tensorrt_status(trt)
    if build_trt:
        tensorrt = build_engines(out, entries, fp16, max_prompts)
    else:
        tensorrt = {"available": False, "reason": reason, "engines": {}}
    graphs = {k: v for k, v in entries.items() if not k.startswith("align/")}
    aligns = {k.split("/", 1)[1]: v for k, v in entries.items() if k.startswith("align/")}
    manifest = build_manifest(bundle, sam.checkpoint_sha256, graphs, aligns, opset=opset, precision=precision,
                              max_prompts=max_prompts, tensorrt=tensorrt, parity=None)
    report: Optional[dict[str, Any]] = None
    if verify:
        from casam_export.verify import verify_export

        report = verify_export(out, manifest, bundle, sam.model, verify_images, quiet=quiet)
        atomic_write_json(out / "parity.json", report)
        manifest["parity"] = {precision: report["summary"], "passed": report["passed"]}
    else:
        manifest["parity"] = {"verified": False, "passed": None}
    atomic_write_json(out / MANIFEST_NAME, manifest)
    _remove_stale(out, manifest)
    if report is not None and not report["passed"]:
        raise ParityError(f"exported chain misses the parity bars: {'; '.join(report['failures'])} (see {out / 'parity.json'})")
    return manifest


def _remove_stale(out: Path, manifest: dict[str, Any]) -> None:
    """Drop align graphs the manifest no longer names (e.g. from a --force overwrite) and staging."""
    named = {t["align"]["file"] for t in manifest["tasks"]}
    for path in (out / "align").glob("*.onnx"):
        if f"align/{path.name}" not in named:
            path.unlink()
    shutil.rmtree(out / ".staging", ignore_errors=True)
