"""The kinds of exported graph: their names, shapes, and how one is written to disk.

Input and output names are the contract with the runtime (docs/FORMATS.md), so they are
declared once here and checked against every graph after export. Graphs come from the
torch.onnx dynamo exporter: the legacy TorchScript exporter freezes the crop sizes into
SAM's decoder, so its masks go wrong whenever the aspect ratio changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import onnx
import torch
from onnx import external_data_helper
from torch import nn

from casam_export.errors import ExportError
from casam_export.fp16 import convert_to_fp16, fp32_node_names
from casam_core.files import atomic_path, sha256_file

Dim = Union[int, str]
#: Protobuf cannot serialise a model over 2 GiB; stay clear of the limit (vit_h's encoder).
EXTERNAL_DATA_BYTES = 1_800_000_000
#: Example sizes for the dynamic dims: torch.export specialises dims traced at 0 or 1.
EXAMPLE_SIZES = {"batch": 2, "prompts": 2, "points": 3}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def io_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


EMBEDDINGS = TensorSpec("embeddings", ("batch", 256, 64, 64))


def encoder_spec(size: int) -> GraphSpec:
    """The encoder graph of a SAM variant whose input is size×size (its recorded preprocessing)."""
    return GraphSpec((TensorSpec("image", ("batch", 3, size, size)),), (EMBEDDINGS,))


ENCODER = encoder_spec(1024)  # SAM's ViTs and MobileSAM
ALIGN = GraphSpec((EMBEDDINGS,), (TensorSpec("aligned", ("batch", 256, 64, 64)),))
DECODER = GraphSpec(
    (
        TensorSpec("embeddings", (1, 256, 64, 64)),
        TensorSpec("point_coords", ("prompts", "points", 2)),
        TensorSpec("point_labels", ("prompts", "points")),
    ),
    (TensorSpec("low_res_masks", ("prompts", 1, 256, 256)), TensorSpec("iou_predictions", ("prompts", 1))),
)
#: The decoder with each prompt's previous low-res logits (SAM's ``mask_input``), for
#: corrections; a separate graph so that ``decoder`` keeps its one-image arithmetic.
DECODER_MASK = GraphSpec(
    (*DECODER.inputs, TensorSpec("mask_input", ("prompts", 1, 256, 256))),
    DECODER.outputs,
)


def router_spec(num_tasks: int) -> GraphSpec:
    return GraphSpec((EMBEDDINGS,), (TensorSpec("pooled", ("batch", 256)), TensorSpec("scores", ("batch", num_tasks))))


def example_inputs(spec: GraphSpec) -> tuple[torch.Tensor, ...]:
    """Seeded example tensors; labels cycle through SAM's point labels so every branch traces."""
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for t in spec.inputs:
        shape = tuple(EXAMPLE_SIZES.get(d, d) if isinstance(d, str) else d for d in t.shape)
        if t.name == "point_labels":
            tensors.append((torch.arange(int(torch.tensor(shape).prod())) % 5 - 1).reshape(shape).float())
        elif t.name == "point_coords":
            tensors.append(torch.rand(shape, generator=gen) * 1024)
        else:
            tensors.append(torch.randn(shape, generator=gen))
    return tuple(tensors)


def dynamic_shapes(spec: GraphSpec, max_prompts: int) -> tuple[dict, ...]:
    """One ``torch.export.Dim`` per named dim, shared across inputs (K of coords = K of labels)."""
    maxima = {"prompts": max_prompts}
    dims = {}
    result = []
    for t in spec.inputs:
        axes = {}
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                if d not in dims:
                    dims[d] = torch.export.Dim(d, max=maxima[d]) if d in maxima else torch.export.Dim(d)
                axes[axis] = dims[d]
        result.append(axes)
    return tuple(result)


def export_graph(module: nn.Module, spec: GraphSpec, opset: int, max_prompts: int) -> onnx.ModelProto:
    """Trace ``module`` with the dynamo exporter into an fp32 ModelProto (with exporter metadata)."""
    module = module.eval()
    args = example_inputs(spec)
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=dynamic_shapes(spec, max_prompts),
                opset_version=opset,
                optimize=True,
                verbose=False,
                report=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
            raise ExportError(f"torch.onnx could not export {type(module).__name__}: {type(exc).__name__}: {exc}") from exc
    return program.model_proto


class _quiet_exporter_logs:
    """The exporter logs a warning per missing torchvision op; they say nothing about our graphs."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def finalize(model: onnx.ModelProto, fp16: bool) -> onnx.ModelProto:
    """Optionally convert to fp16, then drop exporter metadata.

    The metadata holds stack traces with absolute paths of this machine, which would make
    the bytes (and so the sha256 the incremental export relies on) depend on where casam is
    installed. The fp16 converter reads the module hierarchy from it first.
    """
    if fp16:
        model = convert_to_fp16(model, fp32_node_names(model))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del value.metadata_props[:]
    del model.metadata_props[:]
    model.graph.doc_string = ""
    return model


def check_graph(model: onnx.ModelProto, spec: GraphSpec, path: Path) -> None:
    """onnx.checker, strict shape inference, and the exact input/output names and ranks of ``spec``."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred")), strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise ExportError(f"{path.name} fails the ONNX checker or shape inference: {exc}") from exc
    finally:
        path.with_suffix(".inferred").unlink(missing_ok=True)
    for kind, got, want in (("inputs", model.graph.input, spec.inputs), ("outputs", model.graph.output, spec.outputs)):
        names = [v.name for v in got]
        if names != [t.name for t in want]:
            raise ExportError(f"{path.name} has {kind} {names}, expected {[t.name for t in want]}")
        for value, t in zip(got, want):
            dims = value.type.tensor_type.shape.dim
            ok = len(dims) == len(t.shape) and all(
                (d.dim_param == s) if isinstance(s, str) else (d.dim_value == s) for d, s in zip(dims, t.shape)
            )
            if not ok or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                shape = [d.dim_param or d.dim_value for d in dims]
                raise ExportError(f"{path.name}: {value.name} is {shape}, expected float32 {list(t.shape)}")


@dataclass(frozen=True)
class WrittenGraph:
    file: str  # relative to the export folder, content-addressed (``encoder-<sha12>.onnx``)
    sha256: str
    external_data: Optional[dict]


def content_name(rel: str, sha256: str) -> str:
    """``encoder.onnx`` → ``encoder-<sha256[:12]>.onnx`` (``align/x.onnx`` → ``align/x-<sha12>.onnx``;
    ``encoder.onnx.data`` → ``encoder-<sha12>.onnx.data``).

    Graph files are named by their content so that a re-export never overwrites a file the
    deployed manifest names: the old manifest and its files stay valid until the new
    manifest is renamed into place (docs/FORMATS.md).
    """
    path = Path(rel)
    stem, dot, suffix = path.name.partition(".")
    return str(path.with_name(f"{stem}-{sha256[:12]}{dot}{suffix}"))


def check_relative(out: Path, rel: str) -> Path:
    """``out/rel``, refused when ``rel`` could climb out of the export folder (checked lexically)."""
    path = Path(rel)
    if not rel or path.is_absolute() or ".." in path.parts:
        raise ExportError(f"refusing to write {rel!r}: it points outside the export folder {out}")
    return out / path


def write_graph(model: onnx.ModelProto, spec: GraphSpec, out: Path, rel: str) -> WrittenGraph:
    """Check ``model`` and move it into ``out`` under its content name (see ``content_name``).

    ``rel`` is the base name (``encoder.onnx``, ``align/<task>.onnx``); big weights go to a
    ``.data`` file named by its own content. The graph is written into a private staging
    folder first (an external-data file must sit next to its graph under its final name),
    checked there, and moved into place data first, so the folder never holds a graph whose
    weights are missing. A file already there under the same content name holds the same
    bytes and is left untouched.
    """
    check_relative(out, rel)
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    staging = out / ".staging" / f"{rel.replace('/', '_')}.{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        staged = staging / Path(rel).name
        external = None
        if weights > EXTERNAL_DATA_BYTES:
            data_rel = _stage_external(model, staged, rel + ".data")
            check_graph(model, spec, staged)
            external = {"file": data_rel, "sha256": _place(staging / Path(data_rel).name, out / data_rel)}
        else:
            onnx.save_model(model, str(staged))
            check_graph(model, spec, staged)
        final = content_name(rel, sha256_file(staged))
        sha = _place(staged, out / final)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
        with contextlib.suppress(OSError):  # only when no other graph is being staged
            staging.parent.rmdir()
    return WrittenGraph(final, sha, external)


def _stage_external(model: onnx.ModelProto, staged: Path, data_rel: str) -> str:
    """Save ``model`` with its weights in one external file named by the weights' sha256.

    The graph records the weights' file name, so the weights are saved first under a
    provisional name, hashed, renamed, and the (small) graph re-saved pointing at the new
    name. Returns the weights' path relative to the export folder.
    """
    provisional = Path(data_rel).name
    onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=provisional, size_threshold=1024)
    final_rel = content_name(data_rel, sha256_file(staged.parent / provisional))
    final = Path(final_rel).name
    os.replace(staged.parent / provisional, staged.parent / final)
    graph = onnx.load_model(str(staged), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(graph):
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = final
    onnx.save_model(graph, str(staged))
    return final_rel


def _place(staged: Path, target: Path) -> str:
    """Move ``staged`` to ``target`` atomically (unless ``target`` already holds the same bytes); its sha256."""
    sha = sha256_file(staged)
    if target.is_file() and sha256_file(target) == sha:
        return sha  # same content name, same bytes: the deployed file is never touched
    with atomic_path(target) as tmp:
        os.replace(staged, tmp)
    return sha
