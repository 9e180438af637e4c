"""Graph passes behind per-layer precision in ``quantize``: fp16 layers, int4 weight-only layers.

Every pass takes an ``onnx.ModelProto`` and returns a new one, leaving its input as it was (only
:func:`name_nodes` works in place); files and calibration data stay in :mod:`autocomp_plugins.quantize`.

fp16 (:func:`convert_float16`) has two outputs built by one walk over the graph:

- the *deployable* graph: the chosen layers hold float16 weights and compute in float16; a Cast to
  float16 sits where a float32 tensor enters an fp16 region and a Cast to float32 where one leaves
  it. A region grows from a chosen layer through the ops in :data:`REGION_OPS` whose every float
  input is already float16 or a constant (ReLU, residual Add, pooling by max, reshapes ...), so a
  ResNet whose convolutions are all fp16 has Casts only at its two ends, as TensorRT would run it.
- the *emulated* graph (the evaluation twin): the same graph in float32 where every tensor the
  deployable graph holds in float16 is rounded to float16 instead (weights rounded when written,
  activations by a Cast float32 -> float16 -> float32 pair, which ONNX Runtime keeps). It computes
  what the fp16 graph computes up to accumulation: the twin accumulates in float32 and rounds once
  per output, a device may accumulate in float16. The region ops are exact in float16 or correctly
  rounded (+ - * / of two float16 numbers rounded once from float32 equal the float16 result), so
  they add no difference of their own.

ONNX Runtime's CPU provider on x86 has no float16 Conv/Gemm kernels: it inserts Casts to run such
nodes in float32 and then drops the float16 round trips between them, so here the deployable graph
computes with float16 weights but unrounded activations (checked by hand on a two-layer MLP, not
recorded in a benchmark). It loads and runs, but its accuracy here is not
that of fp16 hardware, hence the twin.

Before any pass, :func:`inline_layer_constants` gives each layer its own constant inputs (the
exporter shares equal biases through Identity nodes, which ONNX Runtime's int8 quantizer cannot fuse);
the int8 pass also quantizes the ops between int8 layers (:func:`int8_glue`), so the graph stays
int8 from one int8 layer to the next, and after it :func:`detach_from_qdq` keeps layers not chosen
int8 off the int8-rounded copies of shared activations.

int4 (:func:`quantize_int4`) is weight-only: ONNX Runtime's ``MatMulNBitsQuantizer`` turns a MatMul
with a constant 2-D weight into ``com.microsoft.MatMulNBits`` (4-bit blocks along K, asymmetric,
float32 scales); :func:`gemm_to_matmul` first rewrites a Gemm as MatMul + Add.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "LAYER_OPS",
    "REGION_OPS",
    "FP16_MAX",
    "Layer",
    "layer_name",
    "layer_table",
    "name_nodes",
    "inline_layer_constants",
    "int8_glue",
    "detach_from_qdq",
    "gemm_to_matmul",
    "quantize_int4",
    "convert_float16",
]

FP16_MAX = 65504.0
#: Layer ops and the positions of their float inputs (Conv: X, W, B; Gemm: A, B, C; MatMul: A, B).
LAYER_OPS: dict[str, tuple[int, ...]] = {"Conv": (0, 1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}
#: Ops an fp16 region extends through, and their float inputs (None: all). Each is exact in fp16
#: (data movement, ReLU, max) or correctly rounded, so the emulated twin stays exact through them.
REGION_OPS: dict[str, tuple[int, ...] | None] = {
    "Relu": (0,), "MaxPool": (0,), "Flatten": (0,), "Reshape": (0,), "Identity": (0,), "Transpose": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Concat": None, "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
    "Div": (0, 1),
}
#: Ops the int8 pass quantizes where every activation they read comes from int8 (see :func:`int8_glue`),
#: and their activation inputs (None: all). Data movement, ReLU/clipping, max and average pooling
#: and residual Adds: what ONNX Runtime runs in int8 (QLinearAdd, QLinearGlobalAveragePool ...) or
#: folds into a neighbour's quantization. Softmax, normalisation and products stay float.
INT8_GLUE_OPS: dict[str, tuple[int, ...] | None] = {
    "Relu": (0,), "Clip": (0,), "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,),
    "Flatten": (0,), "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Transpose": (0,),
    "Concat": None, "Add": (0, 1),
}


@dataclass(frozen=True)
class Layer:
    """One quantizable node of a graph, in the user's words."""

    name: str  #: parameter name: the module path, or the node name where two nodes share one
    node: str  #: node name in the graph
    op_type: str
    module: str  #: module path of the torch model the node came from
    int4_unsupported: str | None  #: why int4 weight-only cannot apply, or None when it can


def layer_name(node_name: str) -> str:
    """Module path of an exported node: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``."""
    # The exporter names scopes by attribute, and a container's child as "<container>.<index>":
    # /layer2/layer2.0/shortcut/shortcut.0/Conv is layer2 -> layer2.0 -> shortcut -> shortcut.0.
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
    name, last = "", ""
    for part in parts:
        if last and part.startswith(last + "."):
            name = name[: len(name) - len(last)] + part
        else:
            name = f"{name}.{part}" if name else part
        last = part
    return name or node_name


def name_nodes(model: "onnx.ModelProto") -> None:
    """Give every unnamed node a name (``<op>_<index>``), in place: passes select nodes by name."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


class _Constants:
    """Constant tensors of a graph: initializers, Constant nodes, and Identity chains over them."""

    def __init__(self, graph: "onnx.GraphProto"):
        self._initializers = {i.name: i for i in graph.initializer}
        self._producer = {o: n for n in graph.node for o in n.output if o}

    def get(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        for _ in range(64):  # Identity chains are short; the bound guards against a malformed cycle
            if name in self._initializers:
                return numpy_helper.to_array(self._initializers[name])
            node = self._producer.get(name)
            if node is None:
                return None
            if node.op_type == "Identity":
                name = node.input[0]
                continue
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        return numpy_helper.to_array(attr.t)
            return None
        return None


def _attr(node, name: str, default):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _int4_unsupported(node, constants: _Constants) -> str | None:
    if node.op_type not in ("MatMul", "Gemm"):
        return f"int4 is weight-only for MatMul/Gemm, not {node.op_type}"
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return "Gemm with transA=1"
    weight = constants.get(node.input[1])
    if weight is None:
        return "its weight (second input) is not a constant"
    if weight.ndim != 2 or weight.dtype != np.float32:
        return f"its weight is {weight.ndim}-D {weight.dtype}; int4 needs a 2-D float32 weight"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        if constants.get(node.input[2]) is None and float(_attr(node, "beta", 1.0)) != 1.0:
            return "Gemm with a computed bias and beta != 1"
    return None


def layer_table(model: "onnx.ModelProto") -> dict[str, Layer]:
    """Quantizable layers (Conv, Gemm, MatMul) of ``model`` keyed by parameter name, in graph order."""
    constants = _Constants(model.graph)
    layers: dict[str, Layer] = {}
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        module = layer_name(node.name)
        name = module if module not in layers else node.name
        layers[name] = Layer(name, node.name, node.op_type, module, _int4_unsupported(node, constants))
    return layers


def _copy(model: "onnx.ModelProto") -> "onnx.ModelProto":
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _drop_unused_initializers(graph: "onnx.GraphProto") -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def inline_layer_constants(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Feed each layer a private initializer where it read a constant through Identity nodes.

    The torch exporter shares identical initializers (typically equal biases) through Identity
    nodes; ONNX Runtime's static quantizer needs a Conv's bias to be an initializer, and without one
    leaves a Conv it cannot fuse into QLinearConv (measured: 8 of 11 convolutions of the digits
    ResNet stayed float32 between Q/DQ pairs, slower than fp32).
    """
    from onnx import numpy_helper

    model = _copy(model)
    graph = model.graph
    constants = _Constants(graph)
    initializers = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        for i in range(1, len(node.input)):
            name = node.input[i]
            if not name or name in initializers:
                continue
            value = constants.get(name)
            if value is not None:
                private = f"{node.name}/input{i}"
                graph.initializer.append(numpy_helper.from_array(value, private))
                initializers.add(private)
                node.input[i] = private
    _drop_unused_initializers(graph)
    return model


def int8_glue(model: "onnx.ModelProto", int8_nodes: Iterable[str]) -> list[str]:
    """The nodes besides the layers in ``int8_nodes`` for the int8 pass to quantize, in graph
    order: the ops of :data:`INT8_GLUE_OPS` on a path from int8 to int8, i.e. whose activation
    inputs all come from a chosen layer or another such op, and whose output goes only to chosen
    layers and such ops. Anything else reads float as before (a layer kept in float, a LayerNorm, a
    Sigmoid, the graph's output, an op inside a subgraph): a quantized op there would only add a
    QuantizeLinear, and a float reader would get an int8-rounded input (ONNX Runtime folds a
    quantized ReLU into the quantization before it, which :func:`detach_from_qdq` cannot undo). An
    op with a constant operand (a bias or position-embedding Add, a Concat with a class token)
    stays float too: the quantizer would round that constant to 8 bits per tensor.

    Given only the layers, ONNX Runtime's QDQ quantizer leaves each op between two of them in float:
    a convolution's output is dequantized, its ReLU runs in float and the next layer quantizes again,
    and ONNX Runtime cannot fuse that DequantizeLinear -> QuantizeLinear pair (the two scales
    differ). On the digits CNN, every layer at int8 then took 8-12 % longer than with the ops between
    them quantized too, at every pruning ratio measured (0 to 0.7), at the same accuracy
    (benchmarks/int8_glue.md).
    """
    chosen = set(int8_nodes)
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    # a tensor read inside a subgraph (If, Loop, Scan) or leaving the graph has a float reader
    float_read = {o.name for o in model.graph.output} | _read_in_subgraphs(model.graph)

    def forward(allowed: Iterable["onnx.NodeProto"]) -> list["onnx.NodeProto"]:
        """The ``allowed`` glue ops whose activation inputs all come from int8 (chosen layers, or
        ops kept before them in graph order)."""
        int8_tensors: set[str] = set()
        allowed_names = {n.name for n in allowed}
        kept = []
        for node in model.graph.node:  # ONNX graphs are stored in topological order
            if node.name in chosen:
                int8_tensors.update(node.output)
            elif node.name in allowed_names:
                positions = INT8_GLUE_OPS[node.op_type]
                read = [name for i, name in enumerate(node.input) if name and (positions is None or i in positions)]
                if read and all(name in int8_tensors for name in read):  # a constant is never int8
                    kept.append(node)
                    int8_tensors.update(node.output)
        return kept

    def backward(glue: list["onnx.NodeProto"]) -> list["onnx.NodeProto"]:
        """The ops of ``glue`` whose every reader is a chosen layer or a kept op of ``glue``."""
        kept: set[str] = set()
        for node in reversed(glue):  # readers before the nodes they read from
            outs = [o for o in node.output if o]
            if all(readers.get(o) and o not in float_read
                   and all(r in chosen or r in kept for r in readers[o]) for o in outs):
                kept.add(node.name)
        return [node for node in glue if node.name in kept]

    # dropping an op can leave one after it reading float, and one before it feeding float: repeat
    # both passes until neither drops anything (each only removes, so this ends)
    glue = [n for n in model.graph.node if n.op_type in INT8_GLUE_OPS and n.name not in chosen]
    while True:
        narrowed = backward(forward(glue))
        if len(narrowed) == len(glue):
            return [node.name for node in glue]
        glue = narrowed


def _read_in_subgraphs(graph: "onnx.GraphProto") -> set[str]:
    """Names read by the nodes of any subgraph of ``graph`` (If branches, Loop and Scan bodies)."""
    from onnx import AttributeProto

    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else (
                list(attr.graphs) if attr.type == AttributeProto.GRAPHS else [])
            for sub in subgraphs:
                names |= {name for n in sub.node for name in n.input} | _read_in_subgraphs(sub)
    return names


def detach_from_qdq(model: "onnx.ModelProto", int8_nodes: Iterable[str],
                    source: "onnx.ModelProto") -> "onnx.ModelProto":
    """Let every layer not in ``int8_nodes`` read the float tensor, not its Q -> DQ copy.

    ONNX Runtime's QDQ quantizer sends every consumer of a quantized activation through the
    DequantizeLinear, so a layer chosen fp32 next to an int8 one would read int8-rounded input.
    A layer is given back the tensor the QuantizeLinear reads only where that tensor is the output
    of the node (same name, same output) that computed the layer's input in ``source``, the graph
    before quantization. The quantizer renames: where it folded a ReLU into the quantization, the
    node before the ReLU writes the ReLU's output name, and the layer keeps the int8-rounded copy,
    which holds the ReLU; where the tensor is also a graph output, the node writes
    ``<name>_QuantizeLinear_Input``, which holds the same values.
    """
    keep = set(int8_nodes)
    read = {n.name: list(n.input) for n in source.graph.node}
    made_as, now_as = _written_by(source.graph), _written_by(model.graph)
    model = _copy(model)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    initializers = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in keep or (node.op_type not in LAYER_OPS and node.op_type != "MatMulNBits"):
            continue
        before = read.get(node.name, [])
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in initializers or i >= len(before):
                continue
            tensor, origin = q.input[0], made_as.get(before[i])
            if (now_as.get(tensor) == origin) if origin else tensor == before[i]:  # a graph input: by name
                node.input[i] = tensor
    return model


def _written_by(graph: "onnx.GraphProto") -> dict[str, tuple[str, int]]:
    """Tensor name -> (name of the node that writes it, which of its outputs)."""
    return {o: (n.name, k) for n in graph.node for k, o in enumerate(n.output) if o}


def gemm_to_matmul(model: "onnx.ModelProto", node_names: Iterable[str]) -> "onnx.ModelProto":
    """Rewrite the named Gemm nodes (constant B, transA=0) as MatMul + Add; the MatMul keeps the name.

    ``alpha`` and ``transB`` are folded into the weight, ``beta`` into a constant bias. Nodes that
    are not such Gemms are left alone (:func:`layer_table` says which are).
    """
    from onnx import helper, numpy_helper

    model = _copy(model)
    graph = model.graph
    constants = _Constants(graph)
    wanted = set(node_names)
    nodes = []
    for node in graph.node:
        if node.name not in wanted or node.op_type != "Gemm" or _int4_unsupported(node, constants):
            nodes.append(node)
            continue
        weight = constants.get(node.input[1])
        if _attr(node, "transB", 0):
            weight = weight.T
        weight = np.ascontiguousarray(weight * np.float32(_attr(node, "alpha", 1.0)), dtype=np.float32)
        weight_name = f"{node.name}/weight_kn"
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        out = node.output[0]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{out}/matmul" if bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=node.name))
        if bias:
            value = constants.get(bias)
            if value is not None:
                bias = f"{node.name}/bias"
                scaled = value.astype(np.float32) * np.float32(_attr(node, "beta", 1.0))
                graph.initializer.append(numpy_helper.from_array(scaled, bias))
            nodes.append(helper.make_node("Add", [product, bias], [out], name=f"{node.name}/bias_add"))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return model


@contextlib.contextmanager
def _nbits_quantizer() -> Iterator[type]:
    """ONNX Runtime's MatMulNBitsQuantizer, without the logging it sets up.

    Importing that module calls ``logging.basicConfig(level=INFO)`` (configuring the root logger of
    the host application) and it logs every node at INFO; both are undone here.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    quiet = logging.getLogger(nbits.__name__)
    previous = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        yield nbits.MatMulNBitsQuantizer
    finally:
        quiet.setLevel(previous)


def quantize_int4(model: "onnx.ModelProto", node_names: Iterable[str], block_size: int = 32
                  ) -> tuple["onnx.ModelProto", list[str]]:
    """Weight-only int4 for the named MatMul nodes (run :func:`gemm_to_matmul` on Gemms first).

    Returns the new model and the names among ``node_names`` that were left unchanged.
    """
    wanted = set(node_names)
    model = _copy(model)
    name_nodes(model)
    exclude = [n.name for n in model.graph.node if n.name not in wanted]
    with _nbits_quantizer() as quantizer_type:
        quantizer = quantizer_type(model, bits=4, block_size=block_size, is_symmetric=False,
                                   nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
        quantizer.process()
        out = quantizer.model.model
    still = {n.name for n in out.graph.node if n.op_type != "MatMulNBits"}
    return out, sorted(wanted & still)


def _float_types(model: "onnx.ModelProto") -> dict[str, int]:
    """Element type of every tensor whose type onnx shape inference can tell."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph onnx cannot infer (contrib ops) still converts; types stay unknown
        inferred = model
    types: dict[str, int] = {}
    graph = inferred.graph
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def convert_float16(model: "onnx.ModelProto", node_names: Iterable[str], *, emulate: bool = False
                    ) -> tuple["onnx.ModelProto", dict[str, str]]:
    """The named layers (Conv, Gemm, MatMul) in float16; see the module docstring.

    With ``emulate`` the graph stays float32 and rounds to float16 where the deployable graph
    would hold float16 (the evaluation twin). Model inputs and outputs stay float32. Returns the
    new model and ``{node name: why}`` for the named nodes it left in float32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = _copy(model)
    graph = model.graph
    constants = _Constants(graph)
    types = _float_types(model)
    wanted = set(node_names)
    skipped: dict[str, str] = {}
    half: dict[str, str] = {}  # float32 tensor -> the tensor holding it in float16 (rounded, if emulating)
    native: set[str] = set()  # tensors an fp16 node writes: their float16 version is the original
    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    counter = itertools.count()

    def fresh(base: str) -> str:
        return f"{base}/fp16_{next(counter)}"

    def cast(src: str, dst: str, to: int) -> None:
        nodes.append(helper.make_node("Cast", [src], [dst], name=fresh("Cast"), to=to))

    def round_into(src: str, dst: str) -> None:
        """``dst`` = ``src`` in float16 (deployable) or rounded to float16 (twin)."""
        if emulate:
            mid = fresh(src)
            cast(src, mid, TensorProto.FLOAT16)
            cast(mid, dst, TensorProto.FLOAT)
        else:
            cast(src, dst, TensorProto.FLOAT16)

    def half_constant(name: str, value: np.ndarray) -> str:
        if name not in half:
            rounded = np.clip(value, -FP16_MAX, FP16_MAX).astype(np.float16)
            half[name] = fresh(name)
            new_inits.append(numpy_helper.from_array(rounded.astype(np.float32) if emulate else rounded, half[name]))
        return half[name]

    def float_input(name: str) -> bool:
        return types.get(name, TensorProto.FLOAT) == TensorProto.FLOAT

    for node in graph.node:
        if node.name in wanted and node.op_type in LAYER_OPS:
            positions = [i for i in LAYER_OPS[node.op_type] if i < len(node.input) and node.input[i]]
            bad = [node.input[i] for i in positions if not float_input(node.input[i])]
            if bad or len([o for o in node.output if o]) != 1:
                skipped[node.name] = (f"input {bad[0]!r} is not float32" if bad else "more than one output")
                nodes.append(node)
                continue
        elif node.op_type in REGION_OPS and node.name not in wanted:
            chosen = REGION_OPS[node.op_type]
            positions = [i for i in (range(len(node.input)) if chosen is None else chosen)
                         if i < len(node.input) and node.input[i]]
            values = {i: constants.get(node.input[i]) for i in positions if node.input[i] not in native}
            extends = (
                len([o for o in node.output if o]) == 1 and any(node.input[i] in native for i in positions)
                and all(v is not None and v.dtype == np.float32 for v in values.values())
            )
            if not extends:
                nodes.append(node)
                continue
        else:
            if node.name in wanted:
                skipped[node.name] = f"{node.op_type} is not a layer this pass converts"
            nodes.append(node)
            continue
        for i in positions:
            name = node.input[i]
            if name not in half:
                value = constants.get(name)
                if value is not None and value.dtype == np.float32:
                    half_constant(name, value)
                else:
                    half[name] = fresh(name)
                    round_into(name, half[name])
            node.input[i] = half[name]
        out = node.output[0]
        half[out] = fresh(out)
        native.add(out)
        if emulate:
            node.output[0] = fresh(out)
            nodes.append(node)
            round_into(node.output[0], half[out])
            nodes.append(helper.make_node("Identity", [half[out]], [out], name=fresh("Identity")))
        else:
            node.output[0] = half[out]
            nodes.append(node)
            cast(half[out], out, TensorProto.FLOAT)

    # Casts back to float32 that nothing reads (inside an fp16 region) are dropped.
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.output[0] in native and n.output[0] not in read
                                      and n.op_type in ("Cast", "Identity") and n.input[0] == half[n.output[0]])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]  # types changed; stale entries would contradict them
    _drop_unused_initializers(graph)
    return model, skipped
