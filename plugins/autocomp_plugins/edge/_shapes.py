"""Static shapes for an ONNX graph: every tensor's shape and element type for given input shapes,
with the shape arithmetic computed at run time (``Shape -> Gather -> Div -> Slice``) folded first.
Step 1 of :mod:`autocomp_plugins.edge.costmodel` starts here; private to it (and to the cpu
predictor's features, which read graphs the same way)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import onnx

#: Quantization nodes: never folded, even on constants (the Q/DQ of a weight is how a graph says
#: which nodes are int8).
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _load(graph_or_path: "onnx.ModelProto | str | Path") -> "onnx.ModelProto":
    import onnx

    if isinstance(graph_or_path, (str, Path)):
        return onnx.load(str(graph_or_path))
    return graph_or_path


#: Initializers above this many elements are weights: their values are never needed for shapes.
_MAX_FOLDED_ELEMENTS = 4096
#: Rounds of (shape inference, folding of shape arithmetic); each round resolves what the last exposed.
_MAX_FOLD_ROUNDS = 32


def _prepare(model: "onnx.ModelProto",
             input_shapes: Mapping[str, Sequence[int]]) -> tuple["onnx.ModelProto", set[str]]:
    """A light copy of ``model`` with static input shapes and every tensor's shape inferred.

    Large initializers become typed graph inputs (their names are returned: they are constants)
    so that shape inference never copies weights. ``onnx.shape_inference`` alone stops at shapes
    computed at run time (``Shape -> Gather -> Div -> Slice``, as ``torch.chunk`` exports), so
    sub-graphs of constants and known shapes are evaluated and replaced by initializers, and
    inference runs again until nothing more folds.
    """
    import onnx
    from onnx import helper, numpy_helper

    from autocomp.errors import CandidateError

    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph = light.graph
    weights: set[str] = set()
    kept = []
    listed = {i.name for i in graph.input}  # IR < 4 lists initializers as inputs too
    for init in graph.initializer:
        if math.prod(init.dims) > _MAX_FOLDED_ELEMENTS:
            weights.add(init.name)
            if init.name not in listed:
                graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    constant_inputs = weights | {i.name for i in kept}
    inputs = [i for i in graph.input if i.name not in constant_inputs]
    unknown = sorted(set(input_shapes) - {i.name for i in inputs})
    if unknown:
        raise CandidateError(
            f"input shapes given for {unknown}, which are not inputs of the model; "
            f"its inputs are {[i.name for i in inputs]}"
        )
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in input_shapes:
            shape = [int(d) for d in input_shapes[inp.name]]
            if len(shape) != len(dims):
                raise CandidateError(
                    f"input {inp.name!r} has rank {len(dims)} but the given shape {shape} has rank {len(shape)}"
                )
            for dim, size in zip(dims, shape):
                dim.Clear()
                dim.dim_value = size
        elif any(not d.HasField("dim_value") for d in dims):
            raise CandidateError(f"input {inp.name!r} has a dynamic shape; give its shape in input_shapes")
    del graph.value_info[:]

    for _ in range(_MAX_FOLD_ROUNDS):
        try:
            light = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception as exc:  # onnx raises several types for malformed graphs
            raise CandidateError(f"ONNX shape inference failed: {exc}") from exc
        if not _fold_constants(light, weights, numpy_helper):
            break
    return light, weights


def _fold_constants(model: "onnx.ModelProto", weights: set[str], numpy_helper: Any) -> bool:
    """Evaluate nodes whose inputs are small constants or known shapes; True if any was folded."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    shapes, _ = _tensor_types(model)
    values: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    folded: list[int] = []
    for index, node in enumerate(graph.node):
        ins = [t for t in node.input if t]
        if node.op_type in _QDQ_OPS or any(t in weights for t in ins):
            continue  # Q/DQ of weights stay: they are how the graph says which nodes are int8
        try:
            if node.op_type == "Constant":
                outputs = ReferenceEvaluator(node).run(None, {})
            elif node.op_type == "Shape" and shapes.get(node.input[0]) is not None:
                import numpy as np

                shape = shapes[node.input[0]]
                start, end = _attr(node, "start", 0), _attr(node, "end", len(shape))
                outputs = [np.array(shape[start:end], dtype=np.int64)]
            elif ins and all(t in values and values[t].size <= _MAX_FOLDED_ELEMENTS for t in ins):
                outputs = ReferenceEvaluator(node).run(None, {t: values[t] for t in ins})
            else:
                continue
        except Exception:  # an op the reference evaluator cannot run stays in the graph
            continue
        values.update(zip(node.output, outputs))
        folded.append(index)
    if not folded:
        return False
    removed = set(folded)
    remaining = [n for i, n in enumerate(graph.node) if i not in removed]
    needed = {t for n in remaining for t in n.input} | {o.name for o in graph.output}
    existing = {i.name for i in graph.initializer}
    new_inits = [numpy_helper.from_array(values[t], t) for t in sorted(needed)
                 if t in values and t not in existing]
    del graph.node[:]
    graph.node.extend(remaining)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]
    return True


def _tensor_types(model: "onnx.ModelProto") -> tuple[dict[str, tuple[int, ...] | None], dict[str, int]]:
    """Shape (None where unknown) and element type of every named tensor."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    dtypes: dict[str, int] = {}
    graph = model.graph
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = init.data_type
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = vi.type.tensor_type
        dtypes.setdefault(vi.name, tensor_type.elem_type)
        if vi.name in shapes:
            continue
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tensor_type.shape.dim)
        else:
            shapes[vi.name] = None
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
                    dtypes[node.output[0]] = attr.t.data_type
    return shapes, dtypes


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
