"""A fast latency estimate for the ``cpu`` target, calibrated on measurements from this host.

The ``cpu`` target measures every final artifact; this module lets the search drop a candidate
that cannot meet ``--max-latency`` *before* training it, from the ONNX graph alone, in a few
milliseconds. It is an estimate, not a measurement: ``benchmarks/cpu_predictor.md`` shows how
close it comes on this host.

The model
---------
The edge cost model's per-node analysis (:mod:`autocomp_plugins.edge.costmodel`: operator kind,
precision, MACs, elements moved, fusion of batch norm, activations, residual adds and Q/DQ) is
reduced to a few :data:`FEATURES`, each a sum over the graph per operator kind and precision. Where
ONNX Runtime's CPU provider differs from the edge model's TensorRT-like view, the features follow
ONNX Runtime: a PRelu after a convolution is a kernel of its own (between NCHWc layout reorders),
an Add after a MatMul is not fused, an int8 residual Add is a QLinearAdd, Q/DQ pairs that QDQ fusion
leaves (fp32/int8 boundaries, requantization between an int8 convolution and its ReLU) are kernels,
and shape arithmetic runs at run time (the batch axis is dynamic). Convolutions are priced at the
channel counts ONNX Runtime computes, not the ones the graph declares: at fp32 its NCHWc layout pads
channels to whole blocks (16 with AVX-512, 8 with AVX2; :func:`nchwc_block` asks ONNX Runtime), and
int8 output channels are rounded up to :data:`INT8_CHANNEL_BLOCK`. An int8 convolution whose channel
counts rule out MLAS's symmetric int8 kernels (:func:`int8_conv_is_generic`) runs a generic path
several times slower per MAC, and is priced apart. The prediction is linear::

    latency_ms = sum(coefficient[f] * feature[f] for f in FEATURES)

with non-negative coefficients, so every term reads as a cost: milliseconds per million MACs of
a dense convolution at fp32, per million elements an element-wise kernel moves, per kernel, and
so on. They are fitted by non-negative least squares on the *relative* error (each row divided by
its measured latency), so a 0.2 ms model weighs as much as a 10 ms one. The cpu target runs fp32
and int8; other precisions are priced as fp32.

Calibrations
------------
A calibration is per host and per thread count (:class:`CpuCalibration`, keyed by CPU model,
instruction-set flags, ONNX Runtime version and threads). :func:`load_calibration` looks for

1. one written by :func:`autocomp_plugins.cpu_calibrate.calibrate_cpu` on this host, in ``$AUTOCOMP_CACHE_DIR/cpu_predictor/``
   (``~/.cache/autocomp`` when the variable is unset);
2. the one shipped with autocomp (``cpu_calibration.json``), measured on the host named in it;

and takes the entry whose host matches (and, where it records them, this host's
:data:`HOST_FEATURE_FACTS`) and whose thread count is the configured one. When only a
calibration of another host (or thread count) exists it is used anyway and a warning is logged:
the estimate may then be off by the ratio of the two machines' speeds.

Importing this module is cheap: onnx, onnxruntime, torch and scipy are imported where needed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.results import write_json
from autocomp_plugins.edge.costmodel import _QDQ_OPS

__all__ = [
    "FEATURES",
    "FEATURE_SET",
    "FIT_TARGET",
    "HOST_FEATURE_FACTS",
    "INT8_CHANNEL_BLOCK",
    "SHIPPED_CALIBRATION",
    "CpuCalibration",
    "graph_features",
    "nchwc_block",
    "l1d_bytes",
    "host_feature_facts",
    "host_identity",
    "cache_path",
    "load_calibration",
    "read_calibrations",
    "write_calibrations",
    "predict_latency_ms",
    "int8_conv_is_generic",
    "fit_coefficients",
    "random_folds",
    "out_of_fold_ms",
]

logger = logging.getLogger("autocomp")

#: The calibration shipped with autocomp: this project's build host (see the file for its facts).
SHIPPED_CALIBRATION = Path(__file__).with_name("cpu_calibration.json")

FORMAT_VERSION = 1

#: What a calibration is fitted to (its ``fit["target"]``): the statistic the search measures by
#: default. Calibrations written before that (fitted on the p50) say otherwise and are passed over.
FIT_TARGET = "median of the rounds' fastest runs, TimingPolicy() defaults"
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


# --- host and calibration files -------------------------------------------------------------------


def host_identity() -> dict[str, str]:
    """What a calibration is valid for: CPU model, its vector ISA, and the ONNX Runtime version.

    The ISA flags are part of it because cloud CPUs often report a bare family name (``AMD EPYC``)
    for generations whose kernels differ (AVX2 vs AVX-512, with or without VNNI int8 dot products).
    """
    import onnxruntime as ort

    from autocomp.ort import cpu_flags, host_facts

    facts = host_facts()
    flags = cpu_flags()
    isa = sorted(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd",
                             "asimddp") if f in flags)
    return {"cpu_model": str(facts["cpu_model"]), "machine": platform.machine(),
            "isa": ",".join(isa), "onnxruntime": ort.__version__}


def cache_path(host: Mapping[str, str], threads: int) -> Path:
    """Where :func:`autocomp_plugins.cpu_calibrate.calibrate_cpu` writes (and :func:`load_calibration` looks for) a host's calibration."""
    from autocomp.cache import cache_dir

    key = json.dumps({k: host[k] for k in sorted(host)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir("cpu_predictor", f"{digest}-threads{threads}.json")


@dataclass(frozen=True)
class CpuCalibration:
    """Coefficients of the linear model for one host and thread count, with how they were obtained.

    ``host`` is :func:`host_identity` of the machine measured; ``fit`` holds the fit's facts (number
    of models, in-sample errors, machine load, date); ``source`` says where it was loaded from.
    """

    host: Mapping[str, str]
    threads: int
    coefficients: Mapping[str, float]
    fit: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.coefficients) - set(FEATURES))
        if unknown:
            raise ValueError(f"calibration has coefficients for unknown features {unknown}; "
                             f"known: {sorted(FEATURES)}")
        bad = {k: v for k, v in self.coefficients.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"calibration coefficients must be finite and >= 0, got {bad}")

    def predict(self, features: Mapping[str, float]) -> float:
        """Estimated latency (the fastest run, as the search measures by default) in ms for a graph's
        :func:`graph_features`."""
        return sum(self.coefficients.get(name, 0.0) * value for name, value in features.items())

    def differences(self, host: Mapping[str, str],
                    facts: Mapping[str, int] | None = None) -> dict[str, tuple[Any, Any]]:
        """``{name: (recorded here, given)}`` for each entry of ``host`` (:func:`host_identity`) and
        of ``facts`` (:func:`host_feature_facts`; a calibration that does not record them, fitted
        before 2026-12-07, is not checked on them) that this calibration was measured with otherwise."""
        out = {k: (self.host.get(k), v) for k, v in host.items() if self.host.get(k) != v}
        out.update({k: (self.fit[k], v) for k, v in (facts or {}).items() if k in self.fit and self.fit[k] != v})
        return out

    def matches(self, host: Mapping[str, str], facts: Mapping[str, int] | None = None) -> bool:
        """Whether this calibration was measured on ``host`` (and with ``facts``, when given)."""
        return not self.differences(host, facts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        data["host"] = dict(self.host)
        data["coefficients"] = {k: self.coefficients[k] for k in FEATURES if k in self.coefficients}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "CpuCalibration":
        return cls(host=dict(data["host"]), threads=int(data["threads"]),
                   coefficients={k: float(v) for k, v in data["coefficients"].items()},
                   fit=dict(data.get("fit", {})), source=source)


def read_calibrations(path: Path) -> list[CpuCalibration]:
    """Calibrations in a file: ``{"format": 1, "calibrations": [...]}``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: calibration format {data.get('format')!r}, expected {FORMAT_VERSION}")
    return [CpuCalibration.from_dict(c, source=str(path)) for c in data["calibrations"]]


def write_calibrations(path: Path, calibrations: Sequence[CpuCalibration]) -> Path:
    """Write ``calibrations`` to ``path`` atomically (temporary file, then rename)."""
    write_json(path, {"format": FORMAT_VERSION, "calibrations": [c.to_dict() for c in calibrations]})
    return path


def load_calibration(threads: int = 1, host: Mapping[str, str] | None = None,
                     shipped: Path = SHIPPED_CALIBRATION) -> CpuCalibration:
    """The calibration to predict with for ``threads`` intra-op threads on ``host`` (default: this one).

    Prefers this host's cached calibration (written by :func:`autocomp_plugins.cpu_calibrate.calibrate_cpu`), then the shipped one
    when it was measured on a host like this one. Otherwise it falls back to the shipped calibration
    nearest in thread count and logs a warning naming the difference. A calibration that records
    :data:`HOST_FEATURE_FACTS` other than this host's counts as another host's (not checked when
    ``host`` is given: its facts are not known here). Raises ``FileNotFoundError`` when there is no
    calibration at all.
    """
    facts = None if host is not None else host_feature_facts()  # a given host's are not known here
    host = dict(host or host_identity())
    cached = cache_path(host, threads)
    if cached.exists():
        try:
            for calibration in read_calibrations(cached):
                if calibration.matches(host) and calibration.threads == threads:
                    differ = calibration.differences(host, facts)  # the host matches: only facts can differ
                    if differ:
                        logger.warning("cpu predictor: the calibration in %s was measured on another CPU (%s); "
                                       "using the shipped one. Run `autocomp calibrate --target cpu` to calibrate "
                                       "this host again", cached, _facts_text(differ))
                        break
                    if calibration.fit.get("target", FIT_TARGET) != FIT_TARGET:
                        # fitted before the search measured the fastest run: it predicts the p50
                        logger.warning("cpu predictor: the calibration in %s was fitted on the p50, not on the "
                                       "fastest run the search measures; using the shipped one. Run `autocomp "
                                       "calibrate --target cpu` to calibrate this host again", cached)
                        break
                    if calibration.fit.get("feature_set", 1) != FEATURE_SET:
                        logger.warning("cpu predictor: the calibration in %s was fitted on an older version of "
                                       "the predictor's features; using the shipped one. Run `autocomp "
                                       "calibrate --target cpu` to calibrate this host again", cached)
                        break
                    return calibration
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("cpu predictor: ignoring unreadable calibration %s (%s)", cached, exc)
    options = read_calibrations(shipped) if shipped.exists() else []
    if not options:
        raise FileNotFoundError(f"no cpu calibration: {cached} and {shipped} are missing; run "
                                "`autocomp calibrate --target cpu`")
    same_host = [c for c in options if c.matches(host, facts)]
    for calibration in same_host:
        if calibration.threads == threads:
            return calibration
    pool = same_host or options
    best = min(pool, key=lambda c: (abs(c.threads - threads), c.threads))
    if same_host:
        why = f"it was calibrated for {best.threads} thread(s), not {threads}"
    else:
        why = f"it was calibrated on another host ({_facts_text(best.differences(host, facts))})"
    logger.warning("cpu predictor: %s, so latency estimates may be off by the speed ratio; run "
                   "`autocomp calibrate --target cpu --threads %d` to calibrate this host", why, threads)
    return best


def _facts_text(differ: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())


def predict_latency_ms(onnx_path: Path | str, input_shapes: Mapping[str, Sequence[int]],
                       calibration: CpuCalibration) -> float:
    """Estimated latency (ms; the fastest timed run) of an ONNX model on the calibrated host.

    An estimate from the graph's structure, not a measurement. Raises
    :class:`autocomp.errors.CandidateError` when the graph cannot be analysed.
    """
    return calibration.predict(graph_features(onnx_path, input_shapes))


# --- fitting --------------------------------------------------------------------------------------


def fit_coefficients(rows: Sequence[Mapping[str, float]], latencies_ms: Sequence[float],
                     features: Sequence[str] = tuple(FEATURES)) -> dict[str, float]:
    """Non-negative coefficients minimising the squared *relative* error of the linear model.

    ``rows`` are :func:`graph_features` of the measured graphs, ``latencies_ms`` their measured latency.
    Features no row uses get coefficient 0. Raises ``ValueError`` for mismatched or empty input.
    """
    import numpy as np
    from scipy.optimize import nnls

    if not rows or len(rows) != len(latencies_ms):
        raise ValueError(f"need one latency per row and at least one row, got {len(rows)} rows "
                         f"and {len(latencies_ms)} latencies")
    y = np.asarray(latencies_ms, dtype=float)
    x = np.array([[r.get(f, 0.0) for f in features] for r in rows], dtype=float)
    a = x / y[:, None]  # relative error: (x.c - y) / y = x/y . c - 1
    scale = np.where(np.abs(a).max(axis=0) > 0, np.abs(a).max(axis=0), 1.0)  # conditioning only
    c, _ = nnls(a / scale, np.ones_like(y), maxiter=50 * len(features))
    return {f: float(v) for f, v in zip(features, c / scale)}


def random_folds(n: int, k: int = 5, seed: int = 0) -> list[list[int]]:
    """``k`` disjoint groups of the indices ``0 .. n-1``, shuffled deterministically in ``seed``."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    return [order[f::k].tolist() for f in range(k)]


def out_of_fold_ms(rows: Sequence[Mapping[str, float]], latencies_ms: Sequence[float],
                   groups: Sequence[Sequence[int]], features: Sequence[str] = tuple(FEATURES)) -> list[float]:
    """Each row's prediction (ms) from coefficients fitted on every group but its own: the
    cross-validated figure a calibration reports (``groups`` from :func:`random_folds`, or by family)."""
    predicted = [math.nan] * len(rows)
    for test in groups:
        held = set(test)
        train = [i for i in range(len(rows)) if i not in held]
        coefficients = fit_coefficients([rows[i] for i in train], [latencies_ms[i] for i in train], features)
        for i in test:
            predicted[i] = sum(coefficients[f] * rows[i].get(f, 0.0) for f in features)
    return predicted
