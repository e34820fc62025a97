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
the bundle's recorded intensity handling (``casam_io.image_io.read_prepared``), as the
trainer and the deployment prepare it: scales calibrated on other grey levels (a CT
window's against a min-max slice's) would clip or waste the int8 range the deployment uses.

Verification, per quantised graph, against the same graph in fp32 on the verification
images, with the rest of the chain in fp32 PyTorch: routes identical, mean mask IoU ≥
``INT8_MASK_IOU_BAR``, and the graph's output error recorded. A graph that misses a bar
is written in fp32 instead, with a warning and the record in its manifest entry.

The calibration set is not part of a graph's ``built_from``: a re-export after adding a
task keeps the quantised encoder and earlier alignment layers as they are, and quantises
only the new task's alignment layer (pass --force to re-calibrate everything).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch

from casam_export.errors import ExportError
from casam_bundle import Bundle
from runtime.backends.ort import session_options
from casam_io.image_io import PICTURE_SUFFIXES, files_by_stem, read_prepared
from casam_io.intensity import Intensity
from casam_core.names import IDENTITY
from runtime.preprocess import Preprocessing, preprocess

if TYPE_CHECKING:  # verify imports this module (its int8 bar)
    from casam_export.verify import VerificationImages

PathLike = Union[str, os.PathLike]
INT8 = "int8"
#: Mean mask IoU against the fp32 graph that an int8 graph must reach.
INT8_MASK_IOU_BAR = 0.95
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
#: How the graphs are quantised; part of the int8 graphs' built_from (a change re-quantises).
METHOD = {"format": "QDQ", "weights": "int8 per-channel", "activations": "uint8 per-tensor",
          "calibration": "minmax", "ops": list(QUANTISED_OPS), "activation_products": "fp32",
          "input_products": "fp32", "min_reduction": MIN_REDUCTION}


#: Graphs an int8 export quantises ("align/" covers every task's alignment layer).
INT8_GRAPHS = ("encoder", "align/")


def graph_precision(precision: str, key: str) -> str:
    """The precision graph ``key`` is built in for an export in ``precision``: under int8
    only ``INT8_GRAPHS`` are quantised, the others stay fp32."""
    if precision != INT8:
        return precision
    return INT8 if any(key == g or (g.endswith("/") and key.startswith(g)) for g in INT8_GRAPHS) else "fp32"


def built_from(precision: str) -> dict[str, Any]:
    """What an int8 graph's bytes depend on beyond the fp32 graph's: the method (not the
    calibration images, so that adding a task keeps the other graphs)."""
    return {"quantization": dict(METHOD)} if precision == INT8 else {}


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
    intensity = bundle.preprocessing.intensity
    if folder is not None:
        from casam_export.verify import image_paths

        images = [read_prepared(p, intensity)[0] for p in _spread(image_paths(folder, "--calibration"), count)]
        return CalibrationSet({}, images, f"{Path(folder)} ({len(images)} images)")
    per_task = {name: imgs for name in bundle.task_names if (imgs := _split_images(bundle, name, count, intensity))}
    if not per_task:
        raise ExportError("--int8 needs calibration images, and the bundle's task splits name none that exist "
                          "here; pass --calibration DIR with images of the deployment's domains")
    shared = _spread([img for imgs in per_task.values() for img in imgs], count)
    return CalibrationSet(per_task, shared, f"training images of the bundle's task splits ({', '.join(per_task)})")


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def _split_images(bundle: Bundle, name: str, count: int, intensity: Intensity) -> list[np.ndarray]:
    """Up to ``count`` training images of task ``name`` as its split.json records them,
    prepared with ``intensity`` as the trainer prepared them, or none when the recorded
    dataset is no longer where it was.

    Folder datasets only (images/<stem>.<ext> with the trainer's picture and DICOM suffixes);
    the stems are matched against the folder's listing, never joined into paths, since
    split.json is read from disk. Volume tasks' slices are not looked up: pass --calibration
    for them.
    """
    try:
        record = bundle.load_split(name)
    except (OSError, ValueError):
        return []
    data, train = record.get("data"), record.get("train")
    if not data or not isinstance(train, list) or record.get("kind", "folder") != "folder":
        return []
    folder = Path(str(data)) / "images"
    if not folder.is_dir():
        return []
    by_stem = files_by_stem(folder, PICTURE_SUFFIXES)  # the trainer's listing, and its pick on a shared stem
    chosen = [by_stem[stem] for stem in train if isinstance(stem, str) and stem in by_stem]
    return [read_prepared(p, intensity)[0] for p in _spread(chosen, count)]


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


def quantize_model(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """Static QDQ quantisation of ``model``: per-channel int8 weights, uint8 activations
    calibrated (min/max) on ``feeds``; products of two activations, those that read a graph
    input and those shorter than ``MIN_REDUCTION`` stay fp32 (see ``QUANTISED_OPS``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # onnxruntime.quantization advises its pre-processing on the root logger at WARNING; the
    # graphs are already shape-inferred and onnxruntime optimises them at load.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    with tempfile.TemporaryDirectory(prefix="casam_int8_") as tmp, _calibration_sessions_in_priority_order():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src))
        quantize_static(
            str(src), str(dst), _Reader(feeds),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            # MinMax calibration adds ReduceMin/ReduceMax outputs, so it keeps two scalars per
            # tensor and image, not the tensors themselves (the vit_b encoder's are GBs).
            op_types_to_quantize=list(QUANTISED_OPS), calibrate_method=CalibrationMethod.MinMax,
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
                 checks: Optional[VerificationImages] = None, bar: Optional[float] = None) -> None:
        from casam_export.verify import verification_images
        from models.bundle_models import build_model

        self.bundle, self.calibration = bundle, calibration
        self.bar = INT8_MASK_IOU_BAR if bar is None else bar
        self.prep: Preprocessing = bundle.preprocessing
        self.model = build_model(bundle, sam).eval()
        # the export's own verification images, prepared as the deployment prepares them
        self.verify_images = (checks or verification_images(None, self.prep.intensity)).images
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
        quantized = quantize_model(model, self._inputs(key, images))
        check = self.compare(key, model, quantized)
        record = {"method": dict(METHOD), "calibration": {"source": self.calibration.source, "images": len(images),
                                                           "sha256": self.calibration.digest(key)},
                  "verification": check}
        if check["passed"]:
            return quantized, {**record, "precision": INT8}
        warnings.warn(f"int8 {key} misses its bar ({'; '.join(check['failures'])}); it is exported in fp32",
                      stacklevel=2)
        return model, {**record, "precision": "fp32", "fallback": "fp32"}

    def compare(self, key: str, fp32: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, Any]:
        """The int8 graph against the fp32 graph on the verification images, the rest of the
        chain in fp32 PyTorch: output error, routes, mask IoU."""
        from casam_export.verify import mask_ious

        a, b = _session(fp32), _session(int8)
        ious: list[float] = []
        err = scale = 0.0
        routes_a, routes_b = [], []
        for i, image in enumerate(self.verify_images):
            feeds = self._inputs(key, [image])[0]
            out_a, out_b = a.run(None, feeds)[0], b.run(None, feeds)[0]
            err, scale = max(err, float(np.abs(out_a - out_b).max())), max(scale, float(np.abs(out_a).max()))
            if key == "encoder":
                ra, rb = self._route(out_a), self._route(out_b)
                routes_a.append(ra)
                routes_b.append(rb)
                ea, eb = self._align(out_a, ra), self._align(out_b, ra)
            else:
                ea, eb = out_a, out_b
            ious += mask_ious(self._masks(ea, image, i), self._masks(eb, image, i))
        mean_iou = float(np.mean(ious))
        failures = []
        if routes_a != routes_b:
            failures.append(f"routes differ (fp32 {routes_a}, int8 {routes_b})")
        if mean_iou < self.bar:
            failures.append(f"mean mask IoU {mean_iou:.4f} < {self.bar}")
        return {"images": len(self.verify_images), "masks_compared": len(ious), "output_max_abs_diff": err,
                "output_max_abs": scale, "output_rel_error": err / max(scale, 1e-12),
                "routes_identical": routes_a == routes_b, "mask_iou_mean": mean_iou,
                "mask_iou_min": float(np.min(ious)), "bars": {"routes_identical": True, "mask_iou_mean": self.bar},
                "passed": not failures, "failures": failures}

    def _route(self, embedding: np.ndarray) -> str:
        from models.casam import routes_to_names

        with torch.no_grad():
            _, _, routes = self.model.route(torch.from_numpy(embedding))
        return routes_to_names(routes, self.model.task_names)[0]

    def _align(self, embedding: np.ndarray, route: str) -> np.ndarray:
        from models.router import IDENTITY_INDEX

        index = IDENTITY_INDEX if route == IDENTITY else self.model.task_names.index(route)
        with torch.no_grad():
            return self.model.align(torch.from_numpy(embedding), index).numpy()

    def _masks(self, embedding: np.ndarray, image: np.ndarray, seed: int) -> np.ndarray:
        """Low-resolution masks (logits > 0) of the verification prompts of ``image``."""
        from casam_export.verify import prompts_for
        from runtime.pipeline import Pipeline
        from runtime.preprocess import frame_for

        frame = frame_for(image.shape[0], image.shape[1], self.prep)
        coords, labels, _ = Pipeline.prompts(frame, boxes=prompts_for(image, seed)["boxes"])
        with torch.no_grad():
            low, _ = self.model.decoder(torch.from_numpy(embedding), torch.from_numpy(coords), torch.from_numpy(labels))
        return low.numpy() > 0

