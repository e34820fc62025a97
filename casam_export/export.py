"""``export_bundle``: a bundle on disk → separate ONNX graphs (+ TensorRT engines) + manifest.

Graphs are separate so that adding a task ships only a small alignment graph and a new
router while the large encoder stays untouched: every graph records what it was built from,
and one whose inputs and file are unchanged is kept byte-for-byte.

A deployment folder switches from one export to the next in one step. Graph files are
named by their content (``encoder-<sha12>.onnx``), so new graphs land beside the deployed
ones without touching them; the new manifest is renamed over the old one last, and only
then are the files it no longer names removed. A kill, a full disk or a failed parity
check at any earlier moment leaves the previous manifest and all its files in force
(tests/test_faults.py kills the export at each stage through ``casam_core.faults``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch
from torch import nn
from tqdm import tqdm

from casam_export.errors import ExportError, ParityError
from casam_export.lean_attention import ROWS_PER_CHUNK
from casam_export.lean_encoder import LEAN_ENCODER_VERSION, lean_encoder
from casam_export.lean_decoder import LEAN_DECODER_VERSION, LeanPromptDecoder
from casam_export.graphs import (ALIGN, DECODER, DECODER_MASK, GraphSpec, encoder_spec, export_graph, finalize,
                                 router_spec, write_graph)
from casam_export.manifest import (
    PARITY_FAILED,
    PARITY_REPORT,
    UNVERIFIED,
    build_manifest,
    claim_out_dir,
    graph_entries,
    read_previous,
    remove_unreferenced,
    reusable,
)
from casam_export import quantize
from casam_export.tensorrt_build import build_engines, tensorrt_status
from casam_export.verify import VerificationImages, verification_images, verify_export
from models.sam_loader import FrozenSam, load_frozen_sam, untrained_seed
from casam_core.faults import fault_point
from casam_core.files import PathLike, atomic_write_json
from runtime.manifest import MANIFEST_NAME
from casam_core.names import check_task_name
from casam_bundle import Bundle
from models.bundle_models import build_router, load_alignment

MAX_PROMPTS_LIMIT = 256


def load_bundle_sam(bundle: Bundle, checkpoint: Optional[PathLike]) -> FrozenSam:
    """The bundle's SAM; refused when its weights are not the ones the bundle was trained on."""
    seed = untrained_seed(bundle.sam_model, bundle.checkpoint_sha256)
    kwargs = {"tiny_seed": seed} if seed is not None and checkpoint is None else {}
    sam = load_frozen_sam(bundle.sam_model, checkpoint, **kwargs)
    if sam.checkpoint_sha256 != bundle.checkpoint_sha256:
        raise ExportError(
            f"SAM checkpoint {checkpoint or '(default)'} has sha256 {sam.checkpoint_sha256[:16]}…, but the bundle "
            f"was trained on {bundle.checkpoint_sha256[:16]}…; pass --checkpoint with the bundle's {bundle.sam_model} weights"
        )
    return sam


class _Job:
    """One graph to produce: its base file name (``rel``; written content-named by ``write_graph``),
    its contract, and what its bytes depend on."""

    def __init__(self, key: str, rel: str, spec: GraphSpec, make: Callable[[], nn.Module], precision: str,
                 built_from: dict[str, Any], opset: int,
                 tracing: Callable[[nn.Module], ContextManager[Any]] = lambda module: contextlib.nullcontext()) -> None:
        self.key, self.rel, self.spec, self.make = key, rel, spec, make
        self.precision = quantize.graph_precision(precision, key)  # under int8, per graph
        self.tracing = tracing  # how the module is adjusted while it is traced
        self.built_from = {**built_from, "opset": opset, "precision": self.precision,
                           **quantize.built_from(self.precision), "torch": torch.__version__}


def _jobs(bundle: Bundle, sam: FrozenSam, precision: str, opset: int, max_prompts: int,
          fp32_fallback: bool = True) -> list[_Job]:
    checkpoint = {"sam_model": bundle.sam_model, "checkpoint_sha256": sam.checkpoint_sha256}
    jobs = [
        # Global attention is traced one head and one band of query rows at a time, so the
        # runtime never holds a full heads×4096×4096 map (casam_export/lean_attention.py);
        # GELUs and resizes are written as the nodes onnxruntime runs fast (lean_encoder.py).
        _Job("encoder", "encoder.onnx", encoder_spec(bundle.preprocessing.size), lambda: sam.model.image_encoder, precision,
             {**checkpoint, "attention": f"lean-rows{ROWS_PER_CHUNK}", "encoder": LEAN_ENCODER_VERSION}, opset,
             tracing=lean_encoder),
        # The image side of the decoder is computed once for all of an image's prompts
        # (casam_export/lean_decoder.py).
        _Job("decoder", "decoder.onnx", DECODER, lambda: LeanPromptDecoder(sam.model), precision,
             {**checkpoint, "max_prompts": max_prompts, "decoder": LEAN_DECODER_VERSION}, opset),
        # The same decoder taking each prompt's previous low-res logits (mask_input), for
        # interactive corrections; the plain decoder above stays one image for all prompts.
        _Job("decoder_mask", "decoder_mask.onnx", DECODER_MASK, lambda: LeanPromptDecoder(sam.model), precision,
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
    for job in jobs:  # an int8 graph's files also depend on whether its fp32 copy ships
        job.built_from.update(quantize.built_from(job.precision, fp32_fallback))
    return jobs


def _produce(job: _Job, out: Path, opset: int, max_prompts: int,
             quantizer: Optional[quantize.Quantizer] = None) -> dict[str, Any]:
    module = job.make()
    with job.tracing(module):
        graph = export_graph(module, job.spec, opset, max_prompts)
    model = finalize(graph, fp16=job.precision == "fp16")
    record: dict[str, Any] = {}
    fallback: dict[str, Any] = {}
    if job.precision == quantize.INT8 and quantizer is not None:  # int8, or fp32 where it misses its bar
        fp32_model = model
        model, record = quantizer.quantize(job.key, model)
        if record["precision"] == quantize.INT8 and quantizer.options.fp32_fallback:
            # the runtime's fallback where the int8 graph fails on another CPU (runtime/deployment.py)
            copy = write_graph(fp32_model, job.spec, out, job.rel)
            fallback = {"fp32_fallback": {"file": copy.file, "sha256": copy.sha256, "external_data": copy.external_data}}
    written = write_graph(model, job.spec, out, job.rel)
    return {"file": written.file, "sha256": written.sha256, "precision": record.get("precision", job.precision),
            "external_data": written.external_data, **job.spec.io_dict(), "built_from": job.built_from,
            **({"quantization": record} if record else {}), **fallback}


@dataclass(frozen=True)
class ExportOptions:
    """How a bundle is exported (casam-export's options).

    ``trt``: None builds TensorRT engines where TensorRT and a GPU exist, True requires
    them, False skips them. ``int8`` quantises the encoder and alignment layers, calibrated
    on ``calibration`` (a folder; default: the bundle's task splits), casam_export/quantize.py;
    ``int8_options`` says how, whether fp32 copies ship, and how many images the shipped
    verification set holds (casam_export/verification_set.py). ``force`` writes into an
    --out folder holding another bundle's export or other files (``--overwrite``)."""

    fp16: bool = False
    int8: bool = False
    calibration: Optional[PathLike] = None
    calibration_count: int = quantize.DEFAULT_CALIBRATION_COUNT
    opset: int = 18
    max_prompts: int = 16
    verify: bool = True
    verify_images: Optional[PathLike] = None
    trt: Optional[bool] = None
    force: bool = False
    checkpoint: Optional[PathLike] = None
    quiet: bool = True
    int8_options: quantize.Int8Options = quantize.Int8Options()

    @property
    def precision(self) -> str:
        return quantize.INT8 if self.int8 else "fp16" if self.fp16 else "fp32"


def export_bundle(bundle_dir: PathLike, out_dir: PathLike, options: ExportOptions = ExportOptions(),
                  **changes: Any) -> dict[str, Any]:
    """Export ``bundle_dir`` into ``out_dir`` and return the manifest written there.

    ``options`` (or its fields as keywords, ``export_bundle(b, o, int8=True)``) say how
    (``ExportOptions``). ``verify`` runs the exported chain against the PyTorch model;
    when a bar is missed it writes parity-failed.json and raises ``ParityError`` without
    writing a manifest, so the deployment already in ``out_dir`` (if any) stays in force.

    The folder switches atomically: new graphs get new content names next to the deployed
    ones, the new manifest is renamed over the old one in one step, and only then are the
    files it no longer names removed. A failed or killed export leaves the previous
    manifest and every file it names untouched.
    """
    opts = replace(options, **changes)
    bundle = _check_request(bundle_dir, opts)
    out = Path(out_dir)
    previous = claim_out_dir(out, bundle, opts.force)
    images = quantize.calibration_set(bundle, opts.calibration, opts.calibration_count) if opts.int8 else None
    # Read once, before any graph is traced (a few images): a bad folder fails in seconds.
    checks = verification_images(opts.verify_images, bundle.preprocessing, bundle) if opts.verify or opts.int8 else None
    deployed = read_previous(out) if out.is_dir() else None  # in force until the switch, even with --force
    try:
        out.mkdir(parents=True, exist_ok=True)
        manifest, report = _build(bundle, out, opts, (previous, deployed), (images, checks))
        fault_point("export:before-manifest")
        atomic_write_json(out / MANIFEST_NAME, manifest)  # the switch
    except OSError as exc:  # a full disk, a read-only folder …: one line, and the old deployment stands
        remove_unreferenced(out, deployed)
        raise ExportError(f"export to {out} failed: {exc}; {_kept(deployed, out)}") from exc
    except BaseException:
        remove_unreferenced(out, deployed)
        raise
    fault_point("export:after-manifest")
    if report is not None:
        atomic_write_json(out / PARITY_REPORT, report)
    (out / PARITY_FAILED).unlink(missing_ok=True)
    remove_unreferenced(out, manifest)
    return manifest


def _check_request(bundle_dir: PathLike, opts: ExportOptions) -> Bundle:
    """The cheap checks, before any image is read or graph traced: the options and the bundle."""
    if not 1 <= opts.max_prompts <= MAX_PROMPTS_LIMIT:
        raise ExportError(f"--max-boxes must be between 1 and {MAX_PROMPTS_LIMIT}, got {opts.max_prompts}")
    if not 17 <= opts.opset <= 23:
        raise ExportError(f"--opset must be between 17 and 23 (LayerNormalization needs 17), got {opts.opset}")
    bundle = Bundle.open(bundle_dir)
    if not bundle.task_names:
        raise ExportError(f"bundle {bundle.root} has no tasks yet; train one with casam-train first")
    for name in bundle.task_names:  # each becomes a file name under --out
        check_task_name(name, ExportError, str(bundle.root / "bundle.json"))
    if opts.fp16 and opts.int8:
        raise ExportError("choose one of --fp16 and --int8")
    return bundle


def _build(bundle: Bundle, out: Path, opts: ExportOptions, manifests: tuple[Optional[Mapping[str, Any]], ...],
           image_sets: tuple[Optional[Any], Optional[VerificationImages]]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Graphs (reused where unchanged), engines, the shipped int8 verification set and the
    parity check: the manifest to switch to, and the parity report (None: not verified)."""
    (previous, deployed), (images, checks) = manifests, image_sets
    sam = load_bundle_sam(bundle, opts.checkpoint)
    quantizer = quantize.Quantizer(bundle, sam.model, images, checks, options=opts.int8_options) if images is not None else None
    jobs = _jobs(bundle, sam, opts.precision, opts.opset, opts.max_prompts, opts.int8_options.fp32_fallback)
    entries = _graphs(jobs, graph_entries(previous), out, opts, quantizer)
    manifest = _manifest(bundle, sam, entries, out, opts)
    if quantizer is not None and checks is not None:  # the set the runtime re-runs on other CPUs
        manifest.update(_shipped_verification(out, bundle, quantizer, checks, opts.int8_options.verify_count))
    report = _verify(out, manifest, bundle, sam, checks, opts.quiet, deployed) if opts.verify else None
    return manifest, report


def _graphs(jobs: list[_Job], old: Mapping[str, Mapping[str, Any]], out: Path, opts: ExportOptions,
            quantizer: Optional[quantize.Quantizer] = None) -> dict[str, dict[str, Any]]:
    """Every graph's manifest entry: the previous one where ``reusable``, else a freshly built file."""
    fault_point("export:before-graphs")
    entries: dict[str, dict[str, Any]] = {}
    built = 0
    with tqdm(jobs, desc="export", unit="graph", disable=opts.quiet) as bar:
        for job in bar:
            bar.set_postfix_str(job.key)
            if reusable(old.get(job.key), job.built_from, out):
                entries[job.key] = {**old[job.key], "reused": True}
            else:
                entries[job.key] = {**_produce(job, out, opts.opset, opts.max_prompts, quantizer), "reused": False}
                built += 1
                if built == 1:
                    fault_point("export:after-first-graph")
    return entries


def _manifest(bundle: Bundle, sam: FrozenSam, entries: Mapping[str, dict[str, Any]], out: Path,
              opts: ExportOptions) -> dict[str, Any]:
    """The manifest to write (engines built where asked); ``parity`` says "not verified" until ``_verify`` passes."""
    build_trt, reason = tensorrt_status(opts.trt)
    if build_trt:
        tensorrt = build_engines(out, entries, opts.fp16, opts.max_prompts)
    else:
        tensorrt = {"available": False, "reason": reason, "engines": {}}
    graphs = {k: v for k, v in entries.items() if not k.startswith("align/")}
    aligns = {k.split("/", 1)[1]: v for k, v in entries.items() if k.startswith("align/")}
    settings = {"opset": opts.opset, "precision": opts.precision, "max_prompts": opts.max_prompts}
    return build_manifest(bundle, sam.checkpoint_sha256, graphs, aligns, settings=settings, tensorrt=tensorrt,
                          parity=UNVERIFIED)


def _verify(out: Path, manifest: dict[str, Any], bundle: Bundle, sam: FrozenSam, checks: Optional[VerificationImages],
            quiet: bool, deployed: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Parity of the chain ``manifest`` describes; recorded in it when passed, else ``ParityError`` (no manifest)."""
    report = verify_export(out, manifest, bundle, sam.model, checks, quiet=quiet)
    if not report["passed"]:
        atomic_write_json(out / PARITY_FAILED, report)
        raise ParityError(f"exported chain misses the parity bars: {'; '.join(report['failures'])} "
                          f"(see {out / PARITY_FAILED}); no manifest was written, {_kept(deployed, out)}")
    manifest["parity"] = {"verified": True, "passed": True, manifest["precision"]: report["summary"]}
    return report


def _shipped_verification(out: Path, bundle: Bundle, quantizer: quantize.Quantizer, checks: VerificationImages,
                          count: int) -> dict[str, Any]:
    """The int8 export's verification set and the kernel class of the CPU that verified it."""
    from casam_export.verification_set import write_verification_set
    from runtime.cpu_class import int8_kernel_class

    return {"int8_kernel_class": int8_kernel_class(),
            "verification": write_verification_set(out, bundle, quantizer.model, checks, count)}


def _kept(deployed: Optional[Mapping[str, Any]], out: Path) -> str:
    return f"the previous export in {out} is unchanged" if deployed else f"{out} holds no usable export"
