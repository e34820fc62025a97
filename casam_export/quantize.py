"""int8 export: static QDQ quantisation of the encoder and the alignment layers.

Why QDQ with per-channel weights: QuantizeLinear/DequantizeLinear pairs around each matrix
product are the form that onnxruntime (which fuses them into integer kernels, VNNI/AMX
where the CPU has them) and TensorRT (explicit quantisation) both consume, and per-channel
weight scales keep the alignment layers' 3×3 convolutions and the encoder's projections
accurate where one scale per tensor would not.

Which graphs (``INT8_GRAPHS``):
- the encoder and each task's alignment layer carry nearly all of the multiply-adds, so
  they are quantised;
- the router stays fp32: it is tiny, and fp32 scores keep routing decisions identical;
- the decoder stays fp32: its products are small (K prompt tokens against 4096 image
  tokens), so the QDQ steps cost about what they save; an int8 decoder was tried on the
  tiny export, ran slower and moved the masks (ad hoc, no benchmark record).

Calibration runs on real images of the deployment's domains: by default the training
images recorded in each task's split.json (its own images for its alignment layer, all of
them for the encoder), or the images of ``--calibration DIR``. Every one is prepared with
the bundle's recorded intensity handling (``Preprocessing.read``), as the
trainer and the deployment prepare it: scales calibrated on other grey levels (a CT
window's against a min-max slice's) would clip or waste the int8 range the deployment uses.

Verification, per quantised graph, against the same graph in fp32 on the verification
images (the tasks' held-out images and --verify-images site images, ``verify.verification_images``),
with the rest of the chain in fp32 PyTorch: routes identical, no score crossing or nearing
its task's τ (``runtime.deployment.SCORE_MARGIN``), mean mask IoU ≥ ``INT8_MASK_IOU_BAR``
(also per image label), and the graph's output error recorded. A graph that misses a bar
is written in fp32 instead, with a warning and the record in its manifest entry. A graph
that passes ships with its fp32 copy (unless --no-fp32-fallback), and the export with its
verification set (casam_export/verification_set.py), which the runtime re-runs on a CPU of
another int8 kernel class (runtime/deployment.py).

The calibration set is not part of a graph's ``built_from``: a re-export after adding a
task keeps the quantised encoder and earlier alignment layers as they are, and quantises
only the new task's alignment layer (pass --overwrite to re-calibrate everything).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch

from casam_core.files import PathLike
from casam_export.errors import ExportError
from casam_bundle import Bundle
from runtime.backends.ort import session_options
from casam_export.parity import (INT8_MASK_IOU_BAR, VerificationImages, image_paths, mask_ious, prompts_for, split_images,
                                  spread, verification_images)
from models.bundle_models import build_model
from runtime.prompts import Prompts
from casam_core.names import IDENTITY
from runtime.preprocess import Preprocessing, frame_for, preprocess


INT8 = "int8"
DEFAULT_CALIBRATION_COUNT = 8
#: Ops given QDQ pairs: the matrix products with a constant (weight) operand. Quantising
#: the elementwise ops too adds requantisation steps that cost time and accuracy for no
#: arithmetic saved; the attention products (activation × activation) are left in fp32
#: too: with them quantised the tiny int8 encoder ran slower than fp32, without them faster,
#: at the same error (ad hoc; BENCHMARKS.md, "int8", holds the benchmark of this rule). So do
#: the products that read a graph input (the encoder's patch embedding reads the normalised
#: image): with its patch embedding in int8 the tiny encoder missed the mask bar on real
#: images, and kept in fp32 passed it (ad hoc), for under 1 % of vit_b's multiply-adds.
QUANTISED_OPS = ("Conv", "MatMul", "Gemm")
#: Products with fewer multiply-adds per output than this stay fp32: quantising the input
#: and dequantising the output costs about as much as a short product saves. The tiny
#: encoder, whose transformer products reduce over 32 or 64 features, ran no faster in
#: int8 while they were quantised; with only its longer products in int8 its encoder and
#: alignment layers both ran faster (ad hoc; BENCHMARKS.md, "int8", has the benchmark).
MIN_REDUCTION = 256
@dataclass(frozen=True)
class QuantConfig:
    """How activations are calibrated and weights stored (bench/int8_speed.py measures each).

    ``calibration``: "minmax" (the range seen), "percentile" (the central ``percentile`` %
    of the values seen) or "entropy" (the range that keeps the histogram's KL divergence
    least; through onnxruntime 1.31's quantize_static the same graphs as min-max, see
    ``quantize_model``). ``reduce_range``: 7-bit weights, so that on CPUs whose u8s8 kernels add pairs of
    products in int16 (runtime/cpu_class.py, class ``avx2``) no pair can saturate.
    """

    calibration: str = "minmax"
    reduce_range: bool = False
    percentile: float = 99.999

    def method(self) -> dict[str, Any]:
        """The manifest's ``quantization.method`` and part of an int8 graph's ``built_from``."""
        weights = "int7 per-channel (reduce_range)" if self.reduce_range else "int8 per-channel"
        record = {"format": "QDQ", "weights": weights, "activations": "uint8 per-tensor",
                  "calibration": self.calibration, "ops": list(QUANTISED_OPS), "activation_products": "fp32",
                  "input_products": "fp32", "min_reduction": MIN_REDUCTION}
        return {**record, "percentile": self.percentile} if self.calibration == "percentile" else record


CALIBRATIONS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Options:
    """What ``--int8`` does beyond calibration: how (``config``), whether each int8 graph's
    fp32 copy ships for the runtime to fall back on (``--no-fp32-fallback``), and how many
    images the shipped verification set holds (``--verify-count``)."""

    config: "QuantConfig" = field(default_factory=lambda: DEFAULT_CONFIG)
    fp32_fallback: bool = True
    verify_count: int = 8
#: The defaults: min-max calibration, 8-bit weights. Measured with ``bench/int8_speed.py
#: --ports`` on the tiny export, 16 real images (../shared/data/real, one box from each
#: ground-truth mask), calibrated on 8 others, on the Intel Xeon here (int8 kernel class
#: ``amx``; 2 cores shared with other work, load average 5-15, so speeds are noisy), against fp32 in the same run
#: (bench/results/int8_speed_ports_tiny.json; two runs, end-to-end speed-up):
#:   min-max         IoU mean 0.9912 min 0.9853, routes 16/16, scores ≤ 0.41 %, 1.60× / 1.37×
#:   + reduce_range  IoU mean 0.9887 min 0.9810, routes 16/16, scores ≤ 0.93 %, 1.57× / 1.46×
#:   percentile      IoU mean 0.9923 min 0.9871, routes 16/16, scores ≤ 0.54 %, 1.54× / 1.44×
#:   entropy         the min-max graphs byte for byte (see ``quantize_model``)
#:   min-max, session.x64quantprecision: the same masks, 1.36× / 1.29× (the option only
#:   changes the kernels of CPUs without VNNI; here it cost time).
#: Every variant clears mean IoU 0.97 and min 0.93 here and their speeds differ by less than
#: the noise; min-max is kept because it calibrates with two scalars per tensor where the
#: histogram methods keep each tensor's values (the vit_b encoder's are GBs), and
#: reduce_range, which would keep AVX2's int16 pair sums from saturating, is not the default
#: because it costs accuracy on every CPU while an AVX2 machine re-runs the shipped
#: verification set and falls back per graph (runtime/deployment.py). The AVX2 family could
#: not be measured here: no figure for it is claimed.
DEFAULT_CONFIG = QuantConfig()
#: How the graphs are quantised by default (the method record of ``DEFAULT_CONFIG``).
METHOD = DEFAULT_CONFIG.method()


#: Graphs an int8 export quantises ("align/" covers every task's alignment layer).
INT8_GRAPHS = ("encoder", "align/")


def graph_precision(precision: str, key: str) -> str:
    """The precision graph ``key`` is built in for an export in ``precision``: under int8
    only ``INT8_GRAPHS`` are quantised, the others stay fp32."""
    if precision != INT8:
        return precision
    return INT8 if any(key == g or (g.endswith("/") and key.startswith(g)) for g in INT8_GRAPHS) else "fp32"


def built_from(precision: str, fp32_fallback: bool = True) -> dict[str, Any]:
    """What an int8 graph's files depend on beyond the fp32 graph's: the method (not the
    calibration images, so that adding a task keeps the other graphs), and whether its fp32
    copy is shipped beside it (``--no-fp32-fallback``)."""
    return {"quantization": dict(METHOD), "fp32_fallback": fp32_fallback} if precision == INT8 else {}


# ----- calibration images ---------------------------------------------------------------
@dataclass
class CalibrationSet:
    """Calibration images: per task (its alignment layer) and all together (the encoder)."""

    per_task: dict[str, list[np.ndarray]]
    shared: list[np.ndarray]
    source: str
    digests: dict[str, str] = field(default_factory=dict)

    def for_graph(self, key: str) -> list[np.ndarray]:
        if key.startswith("align/"):
            return self.per_task.get(key.split("/", 1)[1]) or self.shared
        return self.shared

    def digest(self, key: str) -> str:
        """sha256 over the graph's calibration images, recorded in its manifest entry."""
        if key not in self.digests:
            h = hashlib.sha256()
            for image in self.for_graph(key):
                h.update(str(image.shape).encode())
                h.update(np.ascontiguousarray(image).tobytes())
            self.digests[key] = h.hexdigest()
        return self.digests[key]


def calibration_set(bundle: Bundle, folder: Optional[PathLike], count: int) -> CalibrationSet:
    """The calibration images, checked before any graph is exported (a cheap precondition)."""
    if count < 1:
        raise ExportError(f"--calibration-count must be ≥ 1, got {count}")
    prep = bundle.preprocessing
    if folder is not None:
        images = [prep.read(p)[0] for p in spread(image_paths(folder, "--calibration"), count)]
        return CalibrationSet({}, images, f"{Path(folder)} ({len(images)} images)")
    per_task = {name: imgs for name in bundle.task_names if (imgs := split_images(bundle, name, count, prep))}
    if not per_task:
        raise ExportError("--int8 needs calibration images, and the bundle's task splits name none that exist "
                          "here; pass --calibration DIR with images of the deployment's domains")
    shared = spread([img for imgs in per_task.values() for img in imgs], count)
    return CalibrationSet(per_task, shared, f"training images of the bundle's task splits ({', '.join(per_task)})")


# ----- quantisation -----------------------------------------------------------------------
class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> Optional[Mapping[str, np.ndarray]]:
        return next(self._it, None)


def activation_products(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose operands are both computed (attention products)."""
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(x in constant for x in n.input)]


def short_products(model: onnx.ModelProto, min_reduction: int = MIN_REDUCTION) -> list[str]:
    """Names of the matrix products with a constant weight whose reduction (input features,
    or input channels × kernel area) is under ``min_reduction`` multiply-adds per output."""
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    short = []
    for n in model.graph.node:
        if n.op_type not in QUANTISED_OPS or len(n.input) < 2 or n.input[1] not in weights:
            continue
        dims = weights[n.input[1]]
        if n.op_type == "Conv":
            reduction = int(np.prod(dims[1:]))
        elif n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            reduction = dims[-1]
        else:
            reduction = dims[0]
        if reduction < min_reduction:
            short.append(n.name)
    return short


def input_products(model: onnx.ModelProto) -> list[str]:
    """Names of the matrix products that read a graph input directly (the patch embedding)."""
    inputs = {i.name for i in model.graph.input}
    return [n.name for n in model.graph.node if n.op_type in QUANTISED_OPS and any(x in inputs for x in n.input)]


def quantize_model(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                   config: QuantConfig = DEFAULT_CONFIG) -> onnx.ModelProto:
    """Static QDQ quantisation of ``model``: per-channel int8 weights, uint8 activations
    calibrated on ``feeds`` as ``config`` says; products of two activations, those that read a graph
    input and those shorter than ``MIN_REDUCTION`` stay fp32 (see ``QUANTISED_OPS``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if config.calibration not in CALIBRATIONS:
        raise ExportError(f"unknown calibration {config.calibration!r}; use one of {', '.join(CALIBRATIONS)}")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.calibration]

    # onnxruntime.quantization advises its pre-processing on the root logger at WARNING; the
    # graphs are already shape-inferred and onnxruntime optimises them at load.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    with tempfile.TemporaryDirectory(prefix="casam_int8_") as tmp, _calibration_sessions_in_priority_order():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src))
        quantize_static(
            str(src), str(dst), _Reader(feeds),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=config.reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            # MinMax calibration adds ReduceMin/ReduceMax outputs, so it keeps two scalars per
            # tensor and image, not the tensors themselves (the vit_b encoder's are GBs); the
            # histogram methods (percentile, entropy) keep a histogram per tensor.
            op_types_to_quantize=list(QUANTISED_OPS), calibrate_method=method,
            # Entropy, measured: onnxruntime 1.31's quantize_static passes no bin counts to its
            # entropy calibrator, whose defaults (128 histogram bins, 128 quantised bins) leave
            # its KL search one candidate, the full range: the graphs came out byte for byte
            # the min-max ones (bench/results/int8_speed_ports_tiny.json).
            extra_options={"CalibPercentile": config.percentile},
            nodes_to_exclude=activation_products(model) + input_products(model) + short_products(model),
        )
        return onnx.load(str(dst))


@contextlib.contextmanager
def _calibration_sessions_in_priority_order() -> Iterator[None]:
    """Run onnxruntime's calibration session in priority-based node order.

    Calibration appends a ReduceMin and a ReduceMax to every tensor it measures, as graph
    outputs. In onnxruntime's default order those side branches may run last, so every
    measured tensor stays alive until the end of the run: calibrating the vit_b encoder was
    killed by the kernel for its memory (ad hoc, no benchmark record), and fits once the
    reductions run as soon as their input exists, which the priority-based order does.
    onnxruntime.quantization has
    no parameter for its calibrator's session options, so its session factory is replaced
    for the duration of one quantisation, and restored after.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self: Any) -> None:
        options = session_options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's own
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_mem_pattern = False  # one block for the whole plan would hold the peak again
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=options,
                                                  providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = session_options(ort)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


# ----- the exporter's hook ----------------------------------------------------------------
class Quantizer:
    """Quantises the graphs an int8 export asks for, verifies each, falls back when needed.

    ``bar`` is the mean mask IoU an int8 graph must reach against its fp32 graph.
    """

    def __init__(self, bundle: Bundle, sam: torch.nn.Module, calibration: CalibrationSet,
                 checks: Optional[VerificationImages] = None, bar: Optional[float] = None,
                 options: Optional[Int8Options] = None) -> None:
        self.options = options or Int8Options()
        self.bundle, self.calibration, self.config = bundle, calibration, self.options.config
        self.bar = INT8_MASK_IOU_BAR if bar is None else bar
        self.prep: Preprocessing = bundle.preprocessing
        self.model = build_model(bundle, sam).eval()
        # the export's own verification images (the tasks' held-out images, site images),
        # prepared as the deployment prepares them
        checks = checks or verification_images(None, self.prep)
        self.verify_images, self.labels = checks.images, checks.labels_or_default()
        self.thresholds = np.array([float(r.threshold) for r in bundle.tasks], np.float32)  # τ, for the score margins
        self._embeddings: dict[int, np.ndarray] = {}

    def embedding(self, image: np.ndarray) -> np.ndarray:
        """fp32 PyTorch encoder embedding of ``image`` (what the fp32 graph computes), memoised."""
        key = id(image)
        if key not in self._embeddings:
            x, _ = preprocess(image, self.prep)
            with torch.no_grad():
                self._embeddings[key] = self.model.encode(torch.from_numpy(x)).numpy()
        return self._embeddings[key]

    def _inputs(self, key: str, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if key == "encoder":
            return [{"image": preprocess(img, self.prep)[0]} for img in images]
        return [{"embeddings": self.embedding(img)} for img in images]

    def quantize(self, key: str, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """(the graph to write, its manifest record): int8 when it meets the bars, else ``model``."""
        images = self.calibration.for_graph(key)
        quantized = quantize_model(model, self._inputs(key, images), self.config)
        check = self.compare(key, model, quantized)
        record = {"method": self.config.method(), "calibration": {"source": self.calibration.source, "images": len(images),
                                                           "sha256": self.calibration.digest(key)},
                  "verification": check}
        if check["passed"]:
            return quantized, {**record, "precision": INT8}
        warnings.warn(f"int8 {key} misses its bar ({'; '.join(check['failures'])}); it is exported in fp32",
                      stacklevel=2)
        return model, {**record, "precision": "fp32", "fallback": "fp32"}

    def compare(self, key: str, fp32: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, Any]:
        """The int8 graph against the fp32 graph on the verification images, the rest of the
        chain in fp32 PyTorch: output error, routes, the scores' margins to τ (encoder), and
        mask IoU overall and per image label (task of a held-out image, "unknown" site image)."""
        a, b = _session(fp32), _session(int8)
        per_label: dict[str, list[float]] = {}
        ious: list[float] = []
        err = scale = 0.0
        routes_a, routes_b, scores_a, scores_b = [], [], [], []
        for i, image in enumerate(self.verify_images):
            feeds = self._inputs(key, [image])[0]
            out_a, out_b = a.run(None, feeds)[0], b.run(None, feeds)[0]
            err, scale = max(err, float(np.abs(out_a - out_b).max())), max(scale, float(np.abs(out_a).max()))
            if key == "encoder":
                (ra, sa), (rb, sb) = self._route(out_a), self._route(out_b)
                routes_a.append(ra)
                routes_b.append(rb)
                scores_a.append(sa)
                scores_b.append(sb)
                ea, eb = self._align(out_a, ra), self._align(out_b, ra)
            else:
                ea, eb = out_a, out_b
            got = mask_ious(self._masks(ea, image, i), self._masks(eb, image, i))
            ious += got
            per_label.setdefault(self.labels[i], []).extend(got)
        return self._verdict(err, scale, ious, per_label, (routes_a, routes_b), (scores_a, scores_b))

    def _verdict(self, err: float, scale: float, ious: list[float], per_label: Mapping[str, list[float]],
                 routes: tuple[list[str], list[str]], scores: tuple[list[np.ndarray], list[np.ndarray]]) -> dict[str, Any]:
        """The bars: routes identical, no score crossing τ or nearing it (``SCORE_MARGIN``), mean IoU."""
        from runtime.deployment import SCORE_MARGIN, score_margin_failures

        mean_iou = float(np.mean(ious))
        failures = []
        if routes[0] != routes[1]:
            failures.append(f"routes differ (fp32 {routes[0]}, int8 {routes[1]})")
        if scores[0]:
            failures += [f"score margin: {m}" for m in
                         score_margin_failures(np.stack(scores[0]), np.stack(scores[1]), self.thresholds)]
        if mean_iou < self.bar:
            failures.append(f"mean mask IoU {mean_iou:.4f} < {self.bar}")
        return {"images": len(self.verify_images), "masks_compared": len(ious), "output_max_abs_diff": err,
                "output_max_abs": scale, "output_rel_error": err / max(scale, 1e-12),
                "routes_identical": routes[0] == routes[1], "mask_iou_mean": mean_iou,
                "mask_iou_min": float(np.min(ious)),
                "per_label": {k: {"masks": len(v), "iou_mean": float(np.mean(v)), "iou_min": float(np.min(v))}
                              for k, v in per_label.items()},
                "bars": {"routes_identical": True, "mask_iou_mean": self.bar, "score_margin": SCORE_MARGIN},
                "passed": not failures, "failures": failures}

    def _route(self, embedding: np.ndarray) -> tuple[str, np.ndarray]:
        """(route, (N,) scores) of one embedding through the fp32 PyTorch router."""
        from models.casam import routes_to_names

        with torch.no_grad():
            _, scores, routes = self.model.route(torch.from_numpy(embedding))
        return routes_to_names(routes, self.model.task_names)[0], scores.numpy()[0]

    def _align(self, embedding: np.ndarray, route: str) -> np.ndarray:
        from models.router import IDENTITY_INDEX

        index = IDENTITY_INDEX if route == IDENTITY else self.model.task_names.index(route)
        with torch.no_grad():
            return self.model.align(torch.from_numpy(embedding), index).numpy()

    def _masks(self, embedding: np.ndarray, image: np.ndarray, seed: int) -> np.ndarray:
        """Low-resolution masks (logits > 0) of the verification prompts of ``image``."""
        frame = frame_for(image.shape[0], image.shape[1], self.prep)
        coords, labels = Prompts.for_image(image.shape, boxes=prompts_for(image, seed)["boxes"]).encode(frame.scale_xy)
        with torch.no_grad():
            low, _ = self.model.decoder(torch.from_numpy(embedding), torch.from_numpy(coords), torch.from_numpy(labels))
        return low.numpy() > 0

