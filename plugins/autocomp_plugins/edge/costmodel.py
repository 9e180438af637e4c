"""Roofline cost model of an ONNX graph on an edge device (batch as given, usually 1).

Two steps, kept apart so the second can run on a stored summary without the ONNX file:

1. :func:`analyze` reads the graph, infers every tensor's shape for the given input shapes
   (:mod:`autocomp_plugins.edge._shapes`), and turns
   each node into a :class:`NodeWork`: its operator kind, its precision, its multiply-accumulates,
   and the weight and activation elements it moves. Nodes a TensorRT- or XNNPACK-like runtime fuses
   away are marked as fused into the convolution (or GEMM) that produces their input; constant
   sub-graphs and reshape-like nodes are free.
2. :func:`breakdown` and :func:`predict` price that work on a
   :class:`~autocomp_plugins.edge.devices.DeviceSpec`. Per costed node::

       time = max(flops / (peak_ops[precision] * efficiency[kind] * compute_scale),
                  bytes / effective_bandwidth) + overhead_per_node

   and the model's latency is the sum over nodes. ``devices.py`` documents the assumptions.

Operator kinds (:data:`KINDS`): ``conv`` (dense, k > 1 or grouped), ``depthwise`` (one group per
input channel), ``pointwise`` (1x1, one group), ``gemm`` (Gemm, MatMul), ``elementwise``, ``pool``,
``norm`` (normalisations and softmax), ``memory`` (data movement: concat, slice, transpose, resize
...) and ``free`` (reshape-like, constants, shape arithmetic).

Precision of a node comes from the graph: ``int8`` for QLinearConv/QLinearMatMul/ConvInteger/
MatMulInteger, for a Conv/Gemm/MatMul whose input and weight both come through DequantizeLinear (the
QDQ format ``onnxruntime.quantization.quantize_static`` writes) and for a data-movement node that
only reads dequantized int8 tensors; ``fp16`` when the node's output is float16; ``fp32``
otherwise. QuantizeLinear/DequantizeLinear nodes next to an int8 node are free: TensorRT and
XNNPACK fold them into the quantized kernels. :func:`breakdown` and :func:`predict` also take a
``precision`` that prices every node at one precision, as a converted graph would run (a float16
conversion changes no count, only the bytes per element and the peak).

Importing this module is cheap; onnx is imported by :func:`analyze`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from autocomp_plugins.edge._shapes import _QDQ_OPS, _attr, _load, _prepare, _tensor_types

if TYPE_CHECKING:
    import onnx

    from autocomp_plugins.edge.devices import DeviceSpec

__all__ = [
    "KINDS",
    "BYTES_PER_ELEMENT",
    "NodeWork",
    "GraphSummary",
    "NodeCost",
    "analyze",
    "breakdown",
    "predict",
    "predict_summary",
]

KINDS = ("conv", "depthwise", "pointwise", "gemm", "elementwise", "pool", "norm", "memory", "free")

#: Bytes one tensor element takes at each precision (weights and activations alike).
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}

_CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}
_GEMM_OPS = {"Gemm", "MatMul", "QLinearMatMul", "MatMulInteger", "FusedMatMul"}
_INT8_COMPUTE_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
_FREE_OPS = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Size", "Constant",
    "ConstantOfShape",
}
_POOL_OPS = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2",
    "ReduceProd", "ArgMax", "ArgMin",
}
_NORM_OPS = {
    "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "SimplifiedLayerNormalization", "SkipLayerNormalization", "LpNormalization", "Softmax",
    "LogSoftmax", "QLinearSoftmax",
}
_MEMORY_OPS = {
    "Concat", "Split", "Slice", "Transpose", "Resize", "Upsample", "Pad", "Expand", "Tile", "Gather",
    "GatherElements", "GatherND", "ScatterND", "DepthToSpace", "SpaceToDepth", "QLinearConcat",
}
#: Element-wise nodes a fusing runtime folds into the convolution or GEMM producing their input.
_FUSABLE_OPS = {
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Elu",
    "Selu", "Softplus", "Gelu", "Mul", "Add", "Sub", "Div", "BatchNormalization",
}
#: Rough arithmetic per output element of non-GEMM nodes (only matters if not memory-bound).
_FLOPS_PER_ELEMENT = {"elementwise": 1, "norm": 5, "memory": 0}

_INT8_DTYPES = {2, 3}  # onnx.TensorProto.UINT8, INT8
_FLOAT16_DTYPES = {10}  # onnx.TensorProto.FLOAT16 (bfloat16 is not modelled)


@dataclass(frozen=True)
class NodeWork:
    """What one ONNX node asks of the hardware, independent of any device.

    ``activation_elements`` counts the activations the kernel reads and writes (for a fused chain:
    the convolution's input, any residual input, and every chain tensor another node reads).
    ``fused_into`` names the host node when this node costs nothing on its own.
    """

    name: str
    op_type: str
    kind: str
    precision: str
    macs: int = 0
    flops: int = 0
    weight_elements: int = 0
    activation_elements: int = 0
    fused_into: str | None = None

    @property
    def costed(self) -> bool:
        """True when the node is a kernel of its own (not free, not fused)."""
        return self.kind != "free" and self.fused_into is None


@dataclass(frozen=True)
class GraphSummary:
    """The per-node work of one graph at fixed input shapes; what the cost model needs, nothing else."""

    nodes: tuple[NodeWork, ...]
    input_shapes: Mapping[str, tuple[int, ...]]

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes if n.fused_into is None)

    @property
    def precisions(self) -> frozenset[str]:
        """Precisions of the costed nodes."""
        return frozenset(n.precision for n in self.nodes if n.costed)

    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """JSON-ready form; ``compact`` drops free and fused nodes, which never cost anything."""
        nodes = [n for n in self.nodes if n.costed] if compact else list(self.nodes)
        return {"input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "nodes": [asdict(n) for n in nodes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GraphSummary":
        return cls(nodes=tuple(NodeWork(**n) for n in data["nodes"]),
                   input_shapes={k: tuple(v) for k, v in data["input_shapes"].items()})


@dataclass(frozen=True)
class NodeCost:
    """One costed node on one device: the roofline terms and the time it adds, in milliseconds."""

    work: NodeWork
    precision: str
    flops: float
    bytes: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float

    @property
    def total_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.overhead_ms

    @property
    def bound(self) -> str:
        """``compute`` or ``memory``: which roofline term sets this node's time."""
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


# --- step 1: graph -> work ------------------------------------------------------------------


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _operands(node: Any) -> tuple[str, str]:
    """(activation input, weight input) of a convolution or GEMM, whatever its operator."""
    if node.op_type in ("QLinearConv", "QLinearMatMul"):
        return node.input[0], node.input[3]
    return node.input[0], node.input[1]


def _conv_kind(node: Any, weight_shape: tuple[int, ...] | None, in_shape: tuple[int, ...] | None) -> str:
    group = int(_attr(node, "group", 1))
    if group > 1 and in_shape is not None and len(in_shape) > 1 and group == in_shape[1]:
        return "depthwise"
    if group == 1 and weight_shape is not None and all(k == 1 for k in weight_shape[2:]):
        return "pointwise"
    return "conv"


def _macs(node: Any, shapes: Mapping[str, tuple[int, ...] | None]) -> int:
    x, w = _operands(node)
    out = shapes.get(node.output[0])
    if node.op_type in _CONV_OPS:
        weight = shapes.get(w)
        if weight is None:
            return 0
        if node.op_type == "ConvTranspose":  # every input element meets every (out/group * k) weight
            return _numel(shapes.get(x)) * math.prod(weight[1:])
        return _numel(out) * math.prod(weight[1:])
    a = shapes.get(x)
    if out is None or a is None:
        return 0
    k = a[0] if (node.op_type == "Gemm" and _attr(node, "transA", 0)) else a[-1]
    return _numel(out) * k


class _Graph:
    """An inferred graph indexed for analysis: producers, readers, constants, Q/DQ aliases."""

    def __init__(self, model: "onnx.ModelProto", weights: set[str]) -> None:
        self.nodes = list(model.graph.node)
        self.shapes, self.dtypes = _tensor_types(model)
        self.outputs = {o.name for o in model.graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                self.producer[out] = i
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
        # What the runtime folds: initializers, Constant outputs, shapes (static here) and anything
        # computed from constants only, including DequantizeLinear of quantized weights.
        self.constant: set[str] = {i.name for i in model.graph.initializer} | weights
        for node in self.nodes:
            if node.op_type in ("Constant", "Shape", "Size") or all(t in self.constant for t in node.input if t):
                self.constant.update(node.output)
        # A Q -> DQ chain carries the same data: each of its outputs aliases the tensor it quantized.
        self._root: dict[str, str] = {}
        for node in self.nodes:
            if node.op_type in _QDQ_OPS and node.input[0] not in self.constant:
                self._root[node.output[0]] = self.root(node.input[0])

    def root(self, tensor: str) -> str:
        return self._root.get(tensor, tensor)

    def activations(self, node: Any) -> list[str]:
        """The node's non-constant inputs."""
        return [t for t in node.input if t and t not in self.constant]

    def numel(self, tensor: str) -> int:
        return _numel(self.shapes.get(tensor))

    def from_dequantize(self, tensor: str) -> bool:
        p = self.producer.get(tensor)
        return p is not None and self.nodes[p].op_type == "DequantizeLinear"

    def readers(self, root: str) -> list[int]:
        """Nodes that read the data of root tensor ``root``, looking through Q/DQ nodes."""
        found, stack, seen = [], [root], set()
        while stack:
            for c in self.consumers.get(stack.pop(), []):
                if c in seen:
                    continue
                seen.add(c)
                if self.nodes[c].op_type in _QDQ_OPS and self.root(self.nodes[c].output[0]) == root:
                    stack.append(self.nodes[c].output[0])
                else:
                    found.append(c)
        return found

    def float_precision(self, tensor: str) -> str:
        return "fp16" if self.dtypes.get(tensor) in _FLOAT16_DTYPES else "fp32"


@dataclass
class _Labels:
    """What :func:`_label` decides for each node (lists indexed like the graph's nodes)."""

    kind: list[str]
    precision: list[str]
    host: list[int | None]  # the conv/GEMM a fused node folds into
    chain: dict[str, int]  # root tensor -> conv/GEMM whose fused chain wrote it
    residual_reads: dict[int, int]  # conv/GEMM -> elements its fused Adds read from elsewhere


def _label(g: _Graph) -> _Labels:
    """Kind, precision and fusion of every node, in topological order."""
    labels = _Labels(kind=[], precision=[], host=[None] * len(g.nodes), chain={}, residual_reads={})
    kind, precision = labels.kind, labels.precision

    def is_int8(t: str) -> bool:
        r = g.root(t)
        if g.dtypes.get(t) in _INT8_DTYPES or g.from_dequantize(t) or r != t:
            return True
        p = g.producer.get(r)  # written by an int8 convolution, or by a node fused into one?
        return p is not None and precision[p] == "int8" and (r in labels.chain or labels.host[p] is not None)

    for i, node in enumerate(g.nodes):
        op, ins = node.op_type, g.activations(node)
        out = node.output[0] if node.output else ""
        if node.output and all(o in g.constant for o in node.output if o):
            kind.append("free")
            precision.append(g.float_precision(out))
        elif op in _CONV_OPS or op in _GEMM_OPS:
            x, w = _operands(node)
            kind.append(_conv_kind(node, g.shapes.get(w), g.shapes.get(x)) if op in _CONV_OPS else "gemm")
            quantized = op in _INT8_COMPUTE_OPS or (g.from_dequantize(x) and g.from_dequantize(w))
            precision.append("int8" if quantized else g.float_precision(out))
            labels.chain[g.root(out)] = i
        elif op in _QDQ_OPS:
            kind.append("free")  # re-priced by _price_lonely_qdq when no int8 node is next to it
            precision.append(g.float_precision(node.input[0] if op == "QuantizeLinear" else out))
        elif op in _FREE_OPS or (op == "Cast" and g.dtypes.get(node.input[0]) == g.dtypes.get(out)):
            kind.append("free")
            precision.append(g.float_precision(out))
        elif (host := _fusion_host(g, op, ins, labels.chain)) is not None:
            labels.host[i] = host
            kind.append("norm" if op == "BatchNormalization" else "elementwise")
            precision.append(precision[host])
            labels.chain[g.root(out)] = host
            residual = sum(g.numel(t) for t in ins if labels.chain.get(g.root(t)) != host)
            labels.residual_reads[host] = labels.residual_reads.get(host, 0) + residual
        else:
            if op in _POOL_OPS:
                kind.append("pool")
            elif op in _NORM_OPS:
                kind.append("norm")
            elif op in _MEMORY_OPS:
                kind.append("memory")
            else:  # element-wise, and anything unknown: priced as one memory-bound pass
                kind.append("elementwise")
            precision.append("int8" if ins and all(is_int8(t) for t in ins) else g.float_precision(out))
    _price_lonely_qdq(g, labels)
    return labels


def _fusion_host(g: _Graph, op: str, ins: list[str], chain: Mapping[str, int]) -> int | None:
    """The conv/GEMM an element-wise node folds into, or None.

    Unary activations, batch norm and scaling by constants fold into the producer of their input.
    A binary node folds when both inputs come from the same chain (SiLU: ``x * sigmoid(x)``), or,
    for Add/Sub, when one input is a chain's sole output and the other a residual tensor read from
    memory (TensorRT's convolution + add + activation epilogue).
    """
    if op not in _FUSABLE_OPS or not ins:
        return None
    hosts = [chain.get(g.root(t)) for t in ins]
    if len(ins) == 1 or op == "BatchNormalization" or len(set(hosts)) == 1:
        return hosts[0]
    if op not in ("Add", "Sub") or len(ins) != 2:
        return None
    # Fold into the chain whose output nobody else reads (a residual branch is read twice).
    sole = [h for t, h in zip(ins, hosts) if h is not None and len(g.readers(g.root(t))) == 1]
    return max(sole) if sole else None


def _price_lonely_qdq(g: _Graph, labels: _Labels) -> None:
    """Q/DQ next to an int8 node fold into it; any other is an element-wise pass of its own."""
    for i, node in enumerate(g.nodes):
        if node.op_type not in _QDQ_OPS or node.input[0] in g.constant:
            continue
        r = g.root(node.output[0])
        neighbours = g.readers(r) + ([g.producer[r]] if r in g.producer else [])
        next_to_int8 = any(labels.precision[n] == "int8" and g.nodes[n].op_type not in _QDQ_OPS
                           for n in neighbours)
        if not next_to_int8 and r not in labels.chain:
            labels.kind[i] = "elementwise"


def _work(g: _Graph, labels: _Labels, i: int, written: Mapping[int, set[str]]) -> NodeWork:
    """The :class:`NodeWork` of node ``i``."""
    node = g.nodes[i]
    name = node.name or f"{node.op_type}_{i}"
    kind, precision, host = labels.kind[i], labels.precision[i], labels.host[i]
    if kind == "free":
        return NodeWork(name, node.op_type, "free", precision)
    if host is not None:
        host_node = g.nodes[host]
        return NodeWork(name, node.op_type, kind, precision,
                        fused_into=host_node.name or f"{host_node.op_type}_{host}")
    ins = g.activations(node)
    outputs = sum(g.numel(o) for o in node.output if o)
    macs = 0
    weights = 0
    if node.op_type in _CONV_OPS or node.op_type in _GEMM_OPS:
        macs = _macs(node, g.shapes)
        flops = 2 * macs
        weights = sum(g.numel(t) for t in node.input if t and t in g.constant)
        writes = sum(g.numel(t) for t in written.get(i, {g.root(node.output[0])}))
        activations = sum(g.numel(t) for t in ins) + writes + labels.residual_reads.get(i, 0)
    else:
        if kind == "pool":
            kernel = _attr(node, "kernel_shape", None)
            window = math.prod(kernel) if kernel else max(1, sum(g.numel(t) for t in ins) // max(1, outputs))
            flops = outputs * window
        else:
            flops = outputs * _FLOPS_PER_ELEMENT.get(kind, 1)
        if kind == "norm":  # scale, bias, statistics
            weights = sum(g.numel(t) for t in node.input if t and t in g.constant)
        activations = sum(g.numel(t) for t in ins) + outputs
    return NodeWork(name, node.op_type, kind, precision, macs=macs, flops=flops,
                    weight_elements=weights, activation_elements=activations)


def analyze_graph(graph_or_path: "onnx.ModelProto | str | Path",
                  input_shapes: Mapping[str, Sequence[int]]) -> tuple[Any, "_Graph", "_Labels", list[NodeWork]]:
    """:func:`analyze`'s steps with what it drops kept: (loaded model, shape-inferred graph, fusion
    labels, per-node work), for predictors that need tensor sizes inside fused chains."""
    from autocomp.errors import CandidateError

    try:
        original = _load(graph_or_path)
    except Exception as exc:
        raise CandidateError(f"cannot read ONNX model {graph_or_path}: {exc}") from exc
    g = _Graph(*_prepare(original, input_shapes))
    labels = _label(g)
    # A fused chain writes only the tensors a node outside the chain (or the caller) reads.
    written: dict[int, set[str]] = {}
    for tensor, host in labels.chain.items():
        if tensor in g.outputs or any(labels.host[r] != host for r in g.readers(tensor)):
            written.setdefault(host, set()).add(tensor)
    return original, g, labels, [_work(g, labels, i, written) for i in range(len(g.nodes))]


def analyze(graph_or_path: "onnx.ModelProto | str | Path",
            input_shapes: Mapping[str, Sequence[int]]) -> GraphSummary:
    """The per-node work of an ONNX model (path or loaded ``ModelProto``) at ``input_shapes``.

    ``input_shapes`` maps input names to shapes; inputs whose shapes are static in the model may be
    left out. Raises :class:`autocomp.errors.CandidateError` when the file cannot be read, an input
    shape is missing or does not fit the model, or shape inference fails.
    """
    _, _, _, work = analyze_graph(graph_or_path, input_shapes)
    return GraphSummary(nodes=tuple(work),
                        input_shapes={k: tuple(int(d) for d in v) for k, v in input_shapes.items()})


# --- step 2: work -> time ---------------------------------------------------------------------


def breakdown(summary: GraphSummary, device: "DeviceSpec", precision: str | None = None) -> list[NodeCost]:
    """The cost of every costed node of ``summary`` on ``device``, in graph order.

    ``precision`` (``fp32``, ``fp16``, ``int8``) prices every costed node at that precision instead
    of the one read from the graph, as if the graph had been converted (for ``int8``: fully
    quantized). Raises :class:`autocomp.errors.CandidateError` when a node's precision is one the
    device does not run.
    """
    from autocomp.errors import CandidateError

    costs = []
    for work in summary.nodes:
        if not work.costed:
            continue
        p = precision or work.precision
        if p not in device.peak_ops:
            raise CandidateError(
                f"{device.name} does not run {p} (node {work.name!r}, {work.op_type}); "
                f"it runs {sorted(device.peak_ops)}"
            )
        flops = float(work.flops)
        moved = (work.weight_elements + work.activation_elements) * BYTES_PER_ELEMENT[p]
        rate = device.peak_ops[p] * device.efficiency(work.kind)
        costs.append(NodeCost(
            work=work, precision=p, flops=flops, bytes=moved,
            compute_ms=1e3 * flops / rate if flops else 0.0,
            memory_ms=1e3 * moved / device.bandwidth_bytes_s,
            overhead_ms=device.overhead_us * 1e-3,
        ))
    return costs


def predict_summary(summary: GraphSummary, device: "DeviceSpec", precision: str | None = None) -> float:
    """Predicted latency in milliseconds of an analysed graph on ``device`` (see :func:`breakdown`)."""
    return sum(c.total_ms for c in breakdown(summary, device, precision))


def predict(graph_or_path: "onnx.ModelProto | str | Path | GraphSummary",
            input_shapes: Mapping[str, Sequence[int]], device: "DeviceSpec | str",
            precision: str | None = None) -> float:
    """Predicted latency in milliseconds of an ONNX model (path, ``ModelProto`` or summary).

    ``device`` is a :class:`DeviceSpec` or the name or alias of a built-in one (``KeyError``, naming
    the known ones, for another name); ``precision`` as for :func:`breakdown`. Raises
    :class:`autocomp.errors.CandidateError` as :func:`analyze` and :func:`breakdown` do.
    """
    from autocomp_plugins.edge.devices import get_device

    spec = get_device(device) if isinstance(device, str) else device
    summary = graph_or_path if isinstance(graph_or_path, GraphSummary) else analyze(graph_or_path, input_shapes)
    return predict_summary(summary, spec, precision)
