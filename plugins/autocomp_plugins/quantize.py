"""Method ``quantize``: numeric precision chosen per layer, all precisions in one ONNX graph.

Each quantizable layer (Conv, Gemm, MatMul) of the exported model gets one precision parameter whose
choices are, least compressed first, ``fp32``, ``fp16``, ``int8`` and (MatMul/Gemm with a constant
2-D weight only) ``int4``, limited to the ``bits`` of the search-space table and intersected with the
target's precisions. One candidate's graph is assembled in three passes over the fp32 export:

1. int4 weight-only: Gemms become MatMul + Add, then ONNX Runtime's MatMulNBits quantizer (4-bit
   blocks of ``int4_block_size`` along K, asymmetric) replaces the chosen MatMuls.
2. int8: ONNX Runtime static quantization of the chosen nodes, QDQ format, uint8 activations and
   int8 (per-channel) weights, calibrated on workload training data. Measured on this project's
   CPUs, that is the combination ONNX Runtime runs faster than fp32 (int8 activations ran slower;
   the digits ResNet at batch 1, all int8: 1.37x fp32, benchmarks/joint_vs_single.md, quantization
   alone). It runs after int4 so calibration
   sees the int4 weights' outputs. Layers not chosen int8 keep reading unquantized activations.
3. fp16: the chosen nodes (and the ReLU/Add/reshape nodes between them) in float16, with Casts at
   the region boundaries (:mod:`autocomp_plugins._precision`). It runs last, on the quantized graph,
   so the deployable graph and its evaluation twin share one int8 calibration.

When any layer is fp16, :meth:`QuantizeMethod.apply` returns the deployable file and also writes an
*evaluation twin* (same graph in float32, rounding to float16 wherever the deployable graph holds
float16), and puts its path in ``ctx.notes["evaluation_artifact"]``: ONNX Runtime's x86 CPU provider
runs float16 Conv/Gemm in float32 without rounding activations, so the metric must be computed on
the twin while the target times (or predicts) the deployable file. The twin accumulates in float32;
a device accumulating in float16 can differ by the accumulation error.

Anything a pass cannot convert (a layer gone from the candidate, a node type or input it cannot
handle, int4 on a layer without a constant weight) is left in fp32 and reported with ``ctx.skip``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from autocomp.errors import CandidateError, SpaceError
from autocomp.hookspecs import hookimpl
from autocomp.method import EVALUATION_ARTIFACT, BaseModelInfo, CandidateContext, ChoiceParam, Method
from autocomp_plugins import _precision
from autocomp_plugins._precision import Layer, layer_name, layer_table, name_nodes

if TYPE_CHECKING:
    import onnx

__all__ = [
    "QuantizeConfig",
    "QuantizeMethod",
    "PRECISION_BITS",
    "quantizable_layers",
    "load_named",
    "layer_name",
    "quantize_int8",
    "quantize_layers_int8",
]

logger = logging.getLogger("autocomp")

#: Bits in the ``[quantize]`` table -> precision name (4 is int4 weight-only).
PRECISION_BITS = {4: "int4", 8: "int8", 16: "fp16", 32: "fp32"}
#: Least compressed first; anchor trials take the last choice.
_ORDER = ("fp32", "fp16", "int8", "int4")


def _error(key: str, message: str) -> SpaceError:
    return SpaceError(message, key=f"quantize.{key}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: The parameter name of the whole-model precision (``per_layer = false`` or ``"sampled"``).
ALL_LAYERS = "all_layers"
#: The choice of :data:`ALL_LAYERS`, with ``per_layer = "sampled"``, that hands the precision to
#: each layer's own parameter.
PER_LAYER = "per-layer"


@dataclass(frozen=True)
class QuantizeConfig:
    """``[quantize]`` table. ``bits`` lists the precisions to choose from per layer (or for the whole
    model, with ``per_layer = false``; or either, with ``per_layer = "sampled"``)."""

    #: Drawn from 4 (int4 weight-only), 8 (int8), 16 (fp16), 32 (fp32); a list of choices, not a range.
    bits: tuple[int, ...] = (4, 8, 16, 32)
    calibration_samples: int = 256
    per_channel: bool = True
    #: 7-bit weights. "auto": on for x86 CPUs without VNNI, whose u8s8 kernels (VPMADDUBSW)
    #: saturate; measured here it turned an 11-point int8 accuracy loss into 0.3 points.
    reduce_range: bool | str = "auto"
    #: Weights per int4 block (one scale and zero point each) along the input dimension.
    int4_block_size: int = 32
    #: One precision per layer (true) or one for the whole model (false: a single choice,
    #: ``quantize.all_layers``, among the precisions every layer can take). On a CPU every fp32/int8
    #: boundary costs a QuantizeLinear or DequantizeLinear kernel, and independent per-layer draws
    #: are almost never all int8 (12 layers at 80 % each: 7 %). Tried in ``joint.toml`` on the
    #: digits benchmark it did worse than per-layer choices (benchmarks/joint_vs_single.md).
    #: ``"sampled"``: the search chooses, trial by trial: ``quantize.all_layers`` takes one of those
    #: precisions or :data:`PER_LAYER`, and only then is a precision sampled for each layer. In
    #: ``joint.toml`` it beat per-layer draws on both seeds where both ran (cpu hypervolume 0.0252 and
    #: 0.0276 against 0.0249 and 0.0222); later runs spread as widely (benchmarks/joint_vs_single.md).
    per_layer: bool | str = True

    def __post_init__(self) -> None:
        bits = tuple(self.bits) if isinstance(self.bits, (list, tuple)) else (self.bits,)
        bad = [b for b in bits if not _is_int(b) or b not in PRECISION_BITS]
        if bad or not bits:
            raise _error("bits", f"expected a non-empty list drawn from {sorted(PRECISION_BITS)} "
                                 f"(4 int4, 8 int8, 16 fp16, 32 fp32), got {list(bits)!r}")
        object.__setattr__(self, "bits", tuple(sorted(set(bits), reverse=True)))
        if not _is_int(self.calibration_samples) or self.calibration_samples < 1:
            raise _error("calibration_samples", f"expected a whole number >= 1, got {self.calibration_samples!r}")
        if not (isinstance(self.per_layer, bool) or self.per_layer == "sampled"):
            raise _error("per_layer", f"expected true, false or \"sampled\", got {self.per_layer!r}")
        if not isinstance(self.per_channel, bool):
            raise _error("per_channel", f"expected true or false, got {self.per_channel!r}")
        if not (isinstance(self.reduce_range, bool) or self.reduce_range == "auto"):
            raise _error("reduce_range", f"expected true, false or \"auto\", got {self.reduce_range!r}")
        size = self.int4_block_size
        if not _is_int(size) or size < 16 or size & (size - 1):
            raise _error("int4_block_size", f"expected a power of two >= 16 (MatMulNBits needs one), got {size!r}")

    def resolved_reduce_range(self) -> bool:
        return needs_reduce_range() if self.reduce_range == "auto" else bool(self.reduce_range)

    def precisions(self) -> tuple[str, ...]:
        """The precisions ``bits`` asks for, least compressed first."""
        wanted = {PRECISION_BITS[b] for b in self.bits}
        return tuple(p for p in _ORDER if p in wanted)


def needs_reduce_range() -> bool:
    """True on x86 CPUs without VNNI, where ONNX Runtime's u8s8 int8 kernels can saturate."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    from autocomp.ort import cpu_flags

    return not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}  # unknown flags: assume none


def load_named(onnx_path: Path) -> "onnx.ModelProto":
    """The ONNX file at ``onnx_path`` with every node named (:func:`name_nodes`), as the quantize
    method reads its input: layer names map to node names."""
    import onnx

    model = onnx.load(str(onnx_path))
    name_nodes(model)
    return model


def quantizable_layers(onnx_path: Path) -> dict[str, str]:
    """Quantizable layers of an ONNX file: layer name -> node name."""
    return {name: layer.node for name, layer in layer_table(load_named(onnx_path)).items()}


class _Calibration:
    """ONNX Runtime CalibrationDataReader over the first samples of the training split."""

    def __init__(self, inputs, batch_size: int = 32):
        self._batches = [inputs[i : i + batch_size].numpy() for i in range(0, len(inputs), batch_size)]
        self._iter = iter(self._batches)

    def get_next(self):
        batch = next(self._iter, None)
        return None if batch is None else {"input": batch}

    def rewind(self):
        self._iter = iter(self._batches)


def quantize_int8(onnx_in: Path, onnx_out: Path, node_names: Sequence[str], calibration_inputs,
                  per_channel: bool = True, reduce_range: bool | None = None) -> Path:
    """Quantize the nodes named ``node_names`` to int8 (QDQ, u8 activations, s8 weights)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = onnx_out.with_name(onnx_out.stem + ".pre.onnx")
    try:
        # Shape inference only: graph optimisation here would rename the nodes chosen below.
        quant_pre_process(str(onnx_in), str(prepared), skip_optimization=True)
        quantize_static(
            str(prepared), str(onnx_out), _Calibration(calibration_inputs),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=per_channel, nodes_to_quantize=list(node_names),
            reduce_range=needs_reduce_range() if reduce_range is None else reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:
        raise CandidateError(f"ONNX Runtime quantization failed: {type(exc).__name__}: {exc}") from exc
    finally:
        prepared.unlink(missing_ok=True)
    return onnx_out


def quantize_layers_int8(model: "onnx.ModelProto", node_names: Sequence[str], calibration_inputs, work_dir: Path,
                         per_channel: bool = True, reduce_range: bool | None = None) -> "onnx.ModelProto":
    """int8 as the quantize method writes it: the layers ``node_names``, the ops between them
    (:func:`_precision.int8_glue`), and every float layer detached from the Q/DQ nodes.

    ``model`` should have its layer constants inlined (:func:`_precision.inline_layer_constants`);
    ``work_dir`` holds the intermediate files while this runs. Raises :class:`CandidateError`.
    """
    import onnx

    node_names = list(node_names)
    source = Path(work_dir) / "quantize.stage.onnx"
    quantized = Path(work_dir) / "quantize.int8.onnx"
    try:
        onnx.save(model, str(source))
        quantize_int8(source, quantized, [*node_names, *_precision.int8_glue(model, node_names)],
                      calibration_inputs, per_channel, reduce_range)
        return _precision.detach_from_qdq(onnx.load(str(quantized)), node_names, source=model)
    finally:
        source.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)


def _expand_to_factors(setting: Mapping[str, Any], layers: Mapping[str, Layer]) -> dict[str, Any]:
    """A layer replaced by several (low-rank factors ``fc.0``, ``fc.1`` of ``fc``) takes the
    precision sampled for the layer it replaced; :data:`ALL_LAYERS` gives every layer its value,
    unless it is :data:`PER_LAYER`."""
    if ALL_LAYERS in setting and setting[ALL_LAYERS] != PER_LAYER:
        return {name: setting[ALL_LAYERS] for name in layers}
    setting = {name: value for name, value in setting.items() if name != ALL_LAYERS}
    expanded = dict(setting)
    for name in setting:
        if name in layers:
            continue
        factors = [layer for layer in layers if layer.startswith(name + ".") and layer not in setting]
        if factors:
            del expanded[name]
            expanded.update({factor: setting[name] for factor in factors})
    return expanded


class QuantizeMethod(Method):
    name = "quantize"
    stage = "post_export"
    config_type = QuantizeConfig
    description = "per-layer precision: fp32, fp16, int8 (ONNX Runtime static QDQ), int4 weight-only MatMul"

    def parameters(self, config: QuantizeConfig, base: BaseModelInfo) -> Sequence[ChoiceParam]:
        offered = tuple(p for p in config.precisions() if p in base.target.precisions)
        # int4 is weight-only: only for a MatMul/Gemm with a constant weight
        layers = layer_table(load_named(base.onnx_path))
        choices = {name: tuple(p for p in offered if p != "int4" or layer.int4_unsupported is None)
                   for name, layer in layers.items()}
        per_layer = [ChoiceParam(name, c, module=layers[name].module, neutral=c[0])
                     for name, c in choices.items() if len(c) > 1]
        if config.per_layer is True:
            return per_layer
        # one choice for every layer, among the precisions all of them can take
        common = tuple(p for p in offered if all(p in c for c in choices.values()))
        if config.per_layer is False:
            return [ChoiceParam(ALL_LAYERS, common, neutral=common[0])] if len(common) > 1 else []
        if len(common) < 2 or not per_layer:
            return per_layer  # "sampled", with nothing to choose at one level
        # "sampled": the whole model's precision or a precision per layer (PER_LAYER is not the last
        # choice: the anchors take the last one, the strongest common precision)
        gated = (f"{self.name}.{ALL_LAYERS}", PER_LAYER)
        return [ChoiceParam(ALL_LAYERS, (PER_LAYER, *common), neutral=common[0]),
                *(replace(p, only_if=gated) for p in per_layer)]

    def canonical(self, setting: Mapping[str, Any], config: QuantizeConfig) -> Mapping[str, Any]:
        """Every layer at one precision, sampled per layer, is that precision for the whole model."""
        if setting.get(ALL_LAYERS) != PER_LAYER:
            return setting
        precisions = {value for name, value in setting.items() if name != ALL_LAYERS}
        return {ALL_LAYERS: precisions.pop()} if len(precisions) == 1 else setting

    def changes_nothing(self, setting: Mapping[str, Any], config: QuantizeConfig) -> bool:
        """Every layer at fp32, or no layer to quantize."""
        return all(v == "fp32" for k, v in setting.items() if not (k == ALL_LAYERS and v == PER_LAYER))

    def _plan(self, layers: Mapping[str, Layer], setting: Mapping[str, Any], ctx: CandidateContext
              ) -> dict[str, list[Layer]]:
        plan: dict[str, list[Layer]] = {"int4": [], "int8": [], "fp16": []}
        for name, precision in _expand_to_factors(setting, layers).items():
            if precision == "fp32":
                continue
            if name not in layers:
                ctx.skip(self.name, name, "layer not present in this candidate")
            elif precision not in plan:
                ctx.skip(self.name, name, f"unknown precision {precision!r}; known: {', '.join(_ORDER)}")
            elif precision not in ctx.target.precisions:
                ctx.skip(self.name, name, f"target {ctx.target.name!r} does not run {precision}; left in fp32")
            elif precision == "int4" and layers[name].int4_unsupported:
                ctx.skip(self.name, name, f"int4: {layers[name].int4_unsupported}; left in fp32")
            else:
                plan[precision].append(layers[name])
        return plan

    def apply(self, onnx_path: Path, setting: Mapping[str, Any], config: QuantizeConfig, ctx: CandidateContext) -> Path:
        import onnx

        model = _precision.inline_layer_constants(load_named(onnx_path))
        layers = layer_table(model)
        plan = self._plan(layers, setting, ctx)
        by_node = {layer.node: name for name, layer in layers.items()}
        counts = {precision: len(chosen) for precision, chosen in plan.items()}
        if plan["int4"]:
            nodes = [layer.node for layer in plan["int4"]]
            try:
                model = _precision.gemm_to_matmul(model, nodes)
                model, left = _precision.quantize_int4(model, nodes, config.int4_block_size)
            except Exception as exc:
                raise CandidateError(f"int4 weight-only quantization failed: {type(exc).__name__}: {exc}") from exc
            for node in left:
                ctx.skip(self.name, by_node[node], "int4: ONNX Runtime's MatMulNBits quantizer left it; left in fp32")
            counts["int4"] -= len(left)
        if plan["int8"]:
            calib = ctx.workload.train.inputs[: config.calibration_samples]
            model = quantize_layers_int8(model, [layer.node for layer in plan["int8"]], calib, ctx.work_dir,
                                         config.per_channel, config.resolved_reduce_range())
        out = ctx.work_dir / "quantized.onnx"
        if plan["fp16"]:
            nodes = [layer.node for layer in plan["fp16"]]
            try:
                deployable, left = _precision.convert_float16(model, nodes)
                twin, _ = _precision.convert_float16(model, nodes, emulate=True)
            except Exception as exc:
                raise CandidateError(f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc
            for node, why in left.items():
                ctx.skip(self.name, by_node[node], f"fp16: {why}; left in fp32")
            counts["fp16"] -= len(left)
            if counts["fp16"]:
                evaluation = ctx.work_dir / "quantized.eval.onnx"
                onnx.save(twin, str(evaluation))
                ctx.notes[EVALUATION_ARTIFACT] = str(evaluation)
            model = deployable
        for precision, count in counts.items():
            ctx.notes[f"{precision}_layers"] = count
        if not any(counts.values()):
            return onnx_path
        onnx.save(model, str(out))
        return out


@hookimpl
def register_methods(register):
    register(QuantizeMethod())
