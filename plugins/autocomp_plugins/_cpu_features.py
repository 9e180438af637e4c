"""The features of the ``cpu`` latency predictor: what an ONNX graph costs on ONNX Runtime's CPU
provider, counted per operator kind and precision (:func:`graph_features`, :data:`FEATURES`).

Private to :mod:`autocomp_plugins.cpu_predictor`, which fits and applies coefficients to them and
re-exports the public names; its docstring says what the features follow and why. This module
reads the graph and asks ONNX Runtime and the OS two facts of this host (:func:`nchwc_block`,
:func:`l1d_bytes`); importing it is cheap (onnx and onnxruntime are imported where needed). A test
that replaces one of these functions patches this module: the re-exported names in
``cpu_predictor`` are not what :func:`graph_features` and :func:`host_feature_facts` call.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp_plugins.edge._shapes import _QDQ_OPS

logger = logging.getLogger("autocomp")

#: Version of :func:`graph_features` (what each feature counts), stored in a calibration's
#: ``fit["feature_set"]``; a cached calibration of another version is passed over. 2: channel
#: padding, NHWC float activations, per-head MatMuls, exponentiating kernels (2026-11-25). 3: int8
#: convolutions on the generic path priced apart (2026-11-25). 4: unfused fp32 activations on
#: tensors larger than the L1 data cache priced apart (2026-11-25).
FEATURE_SET = 4

_PRECISIONS = ("fp32", "int8")
_CONV_KINDS = ("conv", "pointwise", "depthwise", "gemm")

#: Feature name -> what it counts (units are what one coefficient multiplies).
FEATURES: dict[str, str] = {
    "run": "1 per inference (session.run's fixed cost)",
    **{f"kernels.{p}": f"kernels at {p} (per-kernel dispatch)" for p in _PRECISIONS},
    **{f"{k}.{p}.mmacs": f"million MACs of {k} nodes at {p}" for p in _PRECISIONS for k in _CONV_KINDS},
    **{f"{k}.{p}.melems": f"million activation elements {k} nodes at {p} read and write"
       for p in _PRECISIONS for k in ("conv", "pointwise", "depthwise")},
    **{f"weights.{p}.melems": f"million weight elements of convolution and GEMM nodes at {p}" for p in _PRECISIONS},
    **{f"other.{p}.melems": f"million activation elements element-wise, pooling, normalisation and "
                            f"data-movement kernels at {p} read and write" for p in _PRECISIONS},
    "generic.int8.mmacs": "million MACs of int8 convolutions ONNX Runtime cannot run with its symmetric "
                          "int8 kernels (channel counts they do not take: int8_conv_is_generic)",
    "generic.int8.melems": "million activation elements those convolutions read and write",
    "transcendental.melems": "million activation elements read and written by kernels of their own that "
                             "exponentiate or normalise each element (Softmax, LayerNormalization, "
                             "Erf/GELU, Exp, Sigmoid, Tanh), at any precision",
    "unfused.melems": "million elements read and written by activations ONNX Runtime cannot fuse into an "
                      "fp32 convolution (PRelu ...), each run between layout reorders",
    "unfused.spill.melems": "million elements of those (unfused.melems) on tensors larger than the L1 data "
                            "cache (l1d_bytes), read and written again from L2 between the reorders",
    "unfused.int8.melems": "million elements read and written by float activations between int8 layers that "
                           "ONNX Runtime has no int8 kernel for (PRelu ...), run in the int8 layers' NHWC layout",
    "qdq.kernels": "QuantizeLinear/DequantizeLinear nodes ONNX Runtime keeps as kernels "
                   "(fp32/int8 boundaries, requantization after an int8 convolution's activation)",
    "qdq.melems": "million elements those QuantizeLinear/DequantizeLinear kernels convert",
    "matmul.batches": "matrix products run by MatMul nodes whose operands are both activations (attention: one "
                      "per head and image)",
    "shape.kernels": "shape arithmetic and reshape-like nodes (free in the cost model, run by ONNX Runtime)",
}

_QDQ = _QDQ_OPS
#: Activations ONNX Runtime's CPU provider folds into an fp32 Conv/Gemm/MatMul (ConvActivationFusion,
#: batch-norm and constant folding, NCHWc "Sum" for residual Adds, FusedMatMul scaling).
_ORT_FUSES = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "BatchNormalization",
              "Add", "Sub", "Mul", "Div"}
#: Operators ONNX Runtime runs on int8 when all inputs are dequantized and the output is quantized.
_QLINEAR_OPS = {"Conv", "MatMul", "Gemm", "Add", "Mul", "GlobalAveragePool", "AveragePool", "MaxPool",
                "Concat", "Sigmoid", "LeakyRelu", "Softmax", "Transpose", "Reshape", "Flatten", "Squeeze",
                "Unsqueeze", "Resize", "Gather", "Split", "Slice"}
#: Element-wise kernels whose per-element cost is an exponential or a normalisation, not a copy: in
#: benchmarks/cpu_predictor.md pricing them as other element-wise kernels left the attention-heavy
#: ViT candidates (64 tokens) 12-22 % too fast.
_TRANSCENDENTAL = {"Softmax", "LogSoftmax", "LayerNormalization", "Erf", "Gelu", "Exp", "Sigmoid", "Tanh"}
#: Graph nodes that never reach a kernel (removed or folded by ONNX Runtime before the run).
_NOT_RUN = {"Constant", "Identity", "Dropout"}


def _precision_of(precision: str) -> str:
    return "int8" if precision in ("int8", "int4") else "fp32"


@dataclass
class _Analysis:
    """The edge cost model's analysis of one graph, with the per-tensor shapes it inferred."""

    graph: Any  # costmodel._Graph: nodes, shapes, producers, consumers, constants
    labels: Any  # costmodel._Labels: kind, precision and fusion host of every node
    work: list  # costmodel.NodeWork per node
    original_nodes: int  # nodes of the file as written that reach a kernel or shape computation


def _analyze(graph_or_path: Any, input_shapes: Mapping[str, Sequence[int]]) -> _Analysis:
    """:func:`autocomp_plugins.edge.costmodel.analyze`, keeping the shapes it infers on the way.

    The CPU features need the sizes of tensors the edge model treats as fused away (an activation
    after a convolution, a Q/DQ pair between int8 layers), which :class:`GraphSummary` drops;
    :func:`~autocomp_plugins.edge.costmodel.analyze_graph` keeps them.
    """
    from autocomp_plugins.edge import costmodel as cm

    original, g, labels, work = cm.analyze_graph(graph_or_path, input_shapes)
    runs = sum(1 for n in original.graph.node if n.op_type not in _NOT_RUN and n.op_type not in _QDQ)
    return _Analysis(g, labels, work, runs)


def _quantized_again(g: Any, tensor: str) -> bool:
    """Whether ``tensor`` has readers and every one is a QuantizeLinear."""
    readers = g.consumers.get(tensor, [])
    return bool(readers) and all(g.nodes[r].op_type == "QuantizeLinear" for r in readers)


def _qdq_kernels(g: Any) -> list[int]:
    """Activation Q/DQ nodes ONNX Runtime's QDQ fusion leaves as kernels of their own.

    A node runs on int8 (QLinearConv, QLinearAdd ...) when every activation input comes from a
    DequantizeLinear and its output goes to QuantizeLinear, possibly through a ReLU/Clip (which ONNX
    Runtime drops in front of a QuantizeLinear). A DequantizeLinear all of whose readers run on int8,
    and a QuantizeLinear written by one, fold into it; every other activation Q/DQ is a kernel.
    """
    nodes = g.nodes

    def consumers(tensor: str) -> list[Any]:
        return [nodes[c] for c in g.consumers.get(tensor, [])]

    def producer(tensor: str) -> Any:
        p = g.producer.get(tensor)
        return nodes[p] if p is not None else None

    def dropped_activation(node: Any) -> bool:
        return node.op_type in ("Relu", "Clip") and _quantized_again(g, node.output[0])

    def runs_int8(node: Any) -> bool:
        if node is None or node.op_type not in _QLINEAR_OPS:
            return False
        ins = g.activations(node)
        if not ins or not all(g.from_dequantize(t) for t in ins):
            return False
        readers = consumers(node.output[0])
        if len(readers) == 1 and dropped_activation(readers[0]):
            return True
        return _quantized_again(g, node.output[0])

    kept = []
    for i, node in enumerate(nodes):
        if node.op_type not in _QDQ or node.input[0] in g.constant:
            continue
        if node.op_type == "DequantizeLinear":
            readers = consumers(node.output[0])
            if readers and all(runs_int8(r) for r in readers):
                continue
        else:
            p = producer(node.input[0])
            if runs_int8(p) or (p is not None and dropped_activation(p) and runs_int8(producer(p.input[0]))):
                continue
        kept.append(i)
    return kept


def _unfused_kernel(node: Any, host: Any, host_precision: str, quantized_output: bool) -> tuple[str, str] | None:
    """(feature, precision) of a node the edge model fuses but ONNX Runtime runs as a kernel; None if fused.

    fp32 convolutions fold activations, batch norm and residual Adds; MatMul folds a scale
    (FusedMatMul) but not its bias Add on 3-D inputs; an int8 layer drops a following ReLU/Clip into
    its output quantization when that output is quantized again (``quantized_output``) and runs a
    residual Add as QLinearAdd. Anything else (PRelu after any convolution, an Add after a MatMul) is
    an element-wise kernel of its own; after an fp32 convolution it also costs two layout reorders
    (NCHWc), after an int8 one it runs in the NHWC layout: each has a feature of its own.
    """
    op = node.op_type
    if host_precision == "int8":
        if op in ("Relu", "Clip") and quantized_output:
            return None
        return ("other.int8.melems", "int8") if op in ("Add", "Sub", "Mul") else ("unfused.int8.melems", "fp32")
    if host.op_type in ("Conv", "ConvTranspose"):
        return None if op in _ORT_FUSES else ("unfused.melems", "fp32")
    if op in ("Mul", "Div") or (host.op_type == "Gemm" and op in _ORT_FUSES):
        return None
    return ("other.fp32.melems", "fp32")


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


#: Output channels of an int8 convolution are priced in whole blocks of this many on x86 (where
#: ``nchwc_block() > 1``): MLAS's symmetric int8 convolution packs its filters 16 output channels
#: at a time (``FilterOutputChannelPackCount`` of every x86 dispatch in onnxruntime's
#: ``mlas/lib/convsym.cpp``). On the AVX-512 VNNI host of benchmarks/cpu_predictor.md, blocks of 16
#: also cut the cross-validated error most (8 changed nothing; 32 and 64 were worse).
INT8_CHANNEL_BLOCK = 16


def int8_conv_is_generic(cout: int, cin_per_group: int, group: int, block: int) -> bool:
    """Whether ONNX Runtime runs this int8 convolution without MLAS's symmetric int8 kernels.

    Those kernels (``MlasConvSymPackWSize`` in onnxruntime's ``mlas/lib/convsym.cpp``, on x86) take
    a dense convolution with at least 16 output channels, input channels a multiple of 4 and
    output channels a multiple of 4 (AVX-512) or 8 (AVX2), and a depthwise one whose channel count
    is a multiple of 16; anything else goes through im2col and a generic int8 GEMM. Measured here
    (benchmarks/int8_conv_paths.md), a 3x3 convolution at 12 or 18 channels costs 2-3 times as much
    per MAC as one at 16 or 20, and one at 8 channels 6 times as much as one at 16. ``block`` is
    :func:`nchwc_block` (1 off x86, where this rule is not known and nothing is called generic).
    """
    if block <= 1:
        return False
    if group > 1:
        return not (cin_per_group == 1 and cout == group and group % 16 == 0)
    return not (cout >= 16 and cin_per_group % 4 == 0 and cout % (4 if block >= 16 else 8) == 0)


def _conv_weight(node: Any, g: Any) -> tuple[int, int, int] | None:
    """(output channels, input channels per group, group) of a Conv whose weight shape is known; else None."""
    if node.op_type != "Conv":
        return None
    w = g.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if not w or len(w) != 4 or not all(isinstance(d, int) and d > 0 for d in w[:2]):
        return None
    return w[0], w[1], next((a.i for a in node.attribute if a.name == "group"), 1)


def _channel_padding(node: Any, g: Any, precision: str, block: int) -> tuple[float, float]:
    """How much more work a convolution does than its channel counts say: (MACs, elements) factors.

    At fp32, ONNX Runtime's NCHWc transformer (x86) stores channels in blocks of ``block`` and pads
    the filter's output channels, and input channels of ``block`` or more, up to a whole block: a
    24-channel convolution runs as 32 channels on AVX-512 (block 16), as 24 on AVX2 (block 8). At
    int8 the output channels are priced in blocks of :data:`INT8_CHANNEL_BLOCK`.
    """
    conv = _conv_weight(node, g) if block > 1 else None
    if conv is None:
        return 1.0, 1.0
    cout, cin, group = conv
    if precision == "int8":
        out = _round_up(cout, INT8_CHANNEL_BLOCK) / cout
        return out, out
    out = _round_up(cout, block) / cout
    if group > 1:  # depthwise: one input channel per output channel
        return out, out
    return out * (_round_up(cin, block) / cin if cin >= block else 1.0), out


@functools.lru_cache(maxsize=1)
def l1d_bytes() -> int:
    """This CPU's level-1 data cache per core, in bytes (Linux sysfs; 32 KiB where it says nothing).

    In benchmarks/cpu_predictor.md an fp32 PRelu (run between NCHWc reorders) on a tensor larger
    than this cost more per element: pricing those elements apart (feature set 4) took the
    MobileFaceNets, whose PReLUs are 40 % of their time, from 60 to 64 % within 10 % in
    cross-validation on the 300 (88.0 to 88.7 % over all).
    """
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if level == "1" and kind in ("Data", "Unified"):
            number, unit = (size, "") if size.isdigit() else (size[:-1], size[-1])
            if number.isdigit() and unit in ("", "K", "M"):
                return int(number) * {"": 1, "K": 1024, "M": 1024 ** 2}[unit]
    return 32 * 1024


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """Channels per block of ONNX Runtime's NCHWc layout on this CPU (1: no NCHWc layout).

    Asked of ONNX Runtime itself, once per process: a one-channel convolution is optimised as a
    measurement would be (:func:`autocomp.ort.optimised_model`) and its padded filter read back (16
    on AVX-512, 8 on AVX2). When that fails, a warning is logged and the block is guessed from the
    CPU's flags.
    """
    import tempfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from autocomp.ort import optimised_model

    weight = numpy_helper.from_array(np.ones((1, 1, 1, 1), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    try:
        with tempfile.TemporaryDirectory(prefix="autocomp-nchwc-") as tmp:
            onnx.save(model, str(Path(tmp) / "probe.onnx"))
            optimized = optimised_model(Path(tmp) / "probe.onnx", Path(tmp) / "optimized.onnx")
    except Exception as exc:  # noqa: BLE001 - the probe is a refinement; the flags give a fallback
        from autocomp.ort import cpu_flags

        flags = cpu_flags()
        block = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 1
        logger.warning("cpu predictor: could not ask ONNX Runtime for its NCHWc block (%s: %s); assuming %d "
                       "from the CPU flags", type(exc).__name__, exc, block)
        return block
    dims = [int(i.dims[0]) for i in optimized.graph.initializer if len(i.dims) == 4]
    return max(dims, default=1)


#: Facts of the measured host, beyond :func:`host_identity`, that :func:`graph_features` depends on;
#: a calibration records them in its ``fit`` (those fitted before 2026-12-07 do not).
HOST_FEATURE_FACTS = ("nchwc_block", "l1d_bytes")


def host_feature_facts() -> dict[str, int]:
    """This host's :data:`HOST_FEATURE_FACTS`: :func:`nchwc_block` and :func:`l1d_bytes`."""
    return {"nchwc_block": nchwc_block(), "l1d_bytes": l1d_bytes()}


def graph_features(graph_or_path: Any, input_shapes: Mapping[str, Sequence[int]],
                   block: int | None = None, l1d: int | None = None) -> dict[str, float]:
    """The :data:`FEATURES` of an ONNX model (path or ``ModelProto``) at ``input_shapes``.

    ``block`` is the NCHWc channel block fp32 convolutions are padded to (:func:`nchwc_block`, this
    CPU's, when None; 1 for none); ``l1d`` the L1 data cache in bytes (:func:`l1d_bytes` when None).
    Raises :class:`autocomp.errors.CandidateError` when the graph cannot be analysed.
    """
    a = _analyze(graph_or_path, input_shapes)
    g, labels = a.graph, a.labels
    block = nchwc_block() if block is None else block
    l1d = l1d_bytes() if l1d is None else l1d
    values = dict.fromkeys(FEATURES, 0.0)
    values["run"] = 1.0
    costed_or_fused = 0
    for i, (node, work) in enumerate(zip(g.nodes, a.work)):
        p = _precision_of(work.precision)
        if node.op_type in _QDQ:
            continue
        if work.fused_into is not None:
            costed_or_fused += 1
            # a fused node has its host's precision
            kernel = _unfused_kernel(node, g.nodes[labels.host[i]], p, _quantized_again(g, node.output[0]))
            if kernel is not None:
                moved = (sum(g.numel(t) for t in g.activations(node)) + g.numel(node.output[0])) / 1e6
                feature, kind = kernel
                values[f"kernels.{kind}"] += 1
                values[feature] += moved
                if feature == "unfused.melems" and 4 * g.numel(node.output[0]) > l1d:
                    values["unfused.spill.melems"] += moved
            continue
        if work.kind == "free":
            continue
        costed_or_fused += 1
        values[f"kernels.{p}"] += 1
        if work.kind in _CONV_KINDS:
            macs_scale, elems_scale = _channel_padding(node, g, p, block)
            conv = _conv_weight(node, g) if p == "int8" else None
            if conv is not None and int8_conv_is_generic(*conv, block):  # no packing, so no padding either
                values["generic.int8.mmacs"] += work.macs / 1e6
                values["generic.int8.melems"] += work.activation_elements / 1e6
                values["weights.int8.melems"] += work.weight_elements / 1e6
                continue
            values[f"{work.kind}.{p}.mmacs"] += macs_scale * work.macs / 1e6
            values[f"weights.{p}.melems"] += macs_scale * work.weight_elements / 1e6
            if work.kind != "gemm":
                values[f"{work.kind}.{p}.melems"] += elems_scale * work.activation_elements / 1e6
            elif len(g.activations(node)) == 2:
                values["matmul.batches"] += math.prod((g.shapes.get(node.output[0]) or (1, 1))[:-2])
        elif node.op_type in _TRANSCENDENTAL:
            values["transcendental.melems"] += work.activation_elements / 1e6
        else:
            values[f"other.{p}.melems"] += work.activation_elements / 1e6
    for i in _qdq_kernels(g):
        values["qdq.kernels"] += 1
        values["qdq.melems"] += g.numel(g.nodes[i].input[0]) / 1e6
    values["shape.kernels"] = float(max(0, a.original_nodes - costed_or_fused))
    return values
