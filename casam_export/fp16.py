"""fp32 → fp16 conversion of an exported graph, with the numerically fragile parts kept fp32.

SAM users report overflow and empty masks from all-fp16 LayerNorm: the squared deviations
of a ViT's activations exceed fp16's 65504. So every node that belongs to a LayerNorm
(``LayerNormalization`` and SAM's hand-expanded ``LayerNorm2d``: ReduceMean, Sub, Pow,
Sqrt, Div …), every softmax and every reduction stays fp32, and so does the decoder's
random-Fourier positional encoding (sin/cos of large arguments lose too much in fp16).
Graph inputs and outputs stay fp32, so the runtime never sees the difference.

onnxconverter-common's converter was tried first; it leaves the exporter's own
``Cast(to=FLOAT)`` nodes and their value_info untouched, which breaks shape inference. This
converter is small because it works on dtypes only: it decides per node "fp16 or fp32",
gives every float tensor the dtype of the node that produces it, and inserts a ``Cast``
wherever a consumer needs the other one.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

#: Op types always computed in fp32: reductions, softmax, normalisation, and ops whose
#: float inputs are parameters that must stay fp32 (Resize scales, Range bounds).
FP32_OPS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceLogSum", "ReduceLogSumExp", "CumSum", "TopK", "Resize", "Range",
})

#: Modules whose nodes stay fp32 whatever their op type, matched against the torch class
#: hierarchy the dynamo exporter records on each node (``pkg.torch.onnx.class_hierarchy``).
FP32_MODULES = ("LayerNorm", "PositionEmbeddingRandom")

CLASS_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"


def fp32_node_names(model: onnx.ModelProto) -> set[str]:
    """Names of nodes exported from a module listed in ``FP32_MODULES`` (read from exporter metadata).

    Must run before ``graphs.finalize`` strips the metadata: the class hierarchy is only there.
    """
    keep = set()
    for node in model.graph.node:
        hierarchy = next((p.value for p in node.metadata_props if p.key == CLASS_HIERARCHY_KEY), "")
        if any(m in hierarchy for m in FP32_MODULES):
            keep.add(node.name)
    return keep


def _tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the graph, from strict shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _to_half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """fp32 tensor → fp16, clipped to fp16's finite range (weights beyond it would be inf)."""
    array = numpy_helper.to_array(tensor).astype(np.float32)
    finite = np.finfo(np.float16).max
    return numpy_helper.from_array(np.clip(array, -finite, finite).astype(np.float16), tensor.name)


def convert_to_fp16(model: onnx.ModelProto, fp32_nodes: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` computing in fp16 except ``FP32_OPS`` and ``fp32_nodes``.

    Graph inputs and outputs keep their fp32 dtype (a Cast is inserted at each end).
    Assumes a single-graph model without control-flow subgraphs, which is what the
    exporter produces for CA-SAM's modules; a subgraph is refused rather than half-converted.
    """
    src_types = _tensor_dtypes(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise ValueError("fp16 conversion does not handle control-flow subgraphs")
    for i, node in enumerate(g.node):
        node.name = node.name or f"unnamed_{i}"  # decisions are keyed by node name
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    is_half = _half_nodes(g, set(fp32_nodes), consumers)
    new_type = _convert_initializers(g, is_half, consumers)
    nodes = _rewrite_nodes(g, is_half, src_types, new_type)
    _cast_outputs_back(g, nodes, src_types, new_type)
    # Still topological: each Cast went in just before its first consumer, output casts last.
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(out, strict_mode=True)


def _half_nodes(g: onnx.GraphProto, keep32: set[str], consumers: dict[str, list[onnx.NodeProto]]) -> dict[str, bool]:
    """Which nodes compute in fp16: all but FP32_OPS and ``keep32``; constants follow their
    consumers, so an fp32 node's constant (an eps) keeps its bits."""
    is_half = {n.name: n.op_type not in FP32_OPS and n.name not in keep32 for n in g.node}
    for node in g.node:
        if node.op_type == "Constant":
            users = consumers.get(node.output[0], [])
            is_half[node.name] = bool(users) and all(is_half[u.name] for u in users)
    return is_half


def _convert_initializers(g: onnx.GraphProto, is_half: dict[str, bool],
                          consumers: dict[str, list[onnx.NodeProto]]) -> dict[str, int]:
    """Initializers become fp16 when every consumer computes in fp16, else stay fp32 (+ Cast);
    returns the dtype each initializer and graph input now has."""
    new_type: dict[str, int] = {}
    for i, init in enumerate(g.initializer):
        if init.data_type == FLOAT:
            users = consumers.get(init.name, [])
            if users and all(is_half[u.name] for u in users):
                g.initializer[i].CopyFrom(_to_half(init))
                new_type[init.name] = HALF
            else:
                new_type[init.name] = FLOAT
    for inp in g.input:
        new_type.setdefault(inp.name, inp.type.tensor_type.elem_type)
    return new_type


def _rewrite_nodes(g: onnx.GraphProto, is_half: dict[str, bool], src_types: dict[str, int],
                   new_type: dict[str, int]) -> list[onnx.NodeProto]:
    """The nodes in order, each fed in its own precision (a Cast inserted once per tensor and
    precision, just before its first consumer), with fp16 nodes' float attributes halved."""
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if to == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"cast_{casts[key]}"))
        return casts[key]

    for node in g.node:
        half = is_half[node.name]
        want = HALF if half else FLOAT
        for j, name in enumerate(node.input):
            if name and src_types.get(name) == FLOAT and new_type.get(name, FLOAT) != want:
                node.input[j] = cast(name, want)
        if half:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(_to_half(attr.t))
        for name in node.output:
            if src_types.get(name) == FLOAT:
                new_type[name] = want
        nodes.append(node)
    return nodes


def _cast_outputs_back(g: onnx.GraphProto, nodes: list[onnx.NodeProto], src_types: dict[str, int],
                       new_type: dict[str, int]) -> None:
    """Outputs keep fp32: a converted producer's tensor is renamed and cast back under the
    output's name."""
    for output in g.output:
        if src_types.get(output.name) == FLOAT and new_type.get(output.name) == HALF:
            inner = f"{output.name}__fp16"
            for node in nodes:
                for j, name in enumerate(node.output):
                    if name == output.name:
                        node.output[j] = inner
                for j, name in enumerate(node.input):
                    if name == output.name:
                        node.input[j] = inner
            nodes.append(helper.make_node("Cast", [inner], [output.name], to=FLOAT, name=f"cast_{output.name}_fp32"))
