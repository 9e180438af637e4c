"""The edge targets: operator classification, hand-counted work, precision detection, calibration."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import autocomp_plugins.edge as edge
from autocomp.errors import CandidateError, TargetError
from autocomp.plugins import load_registry
from autocomp_plugins.edge import calibrate as cal
from autocomp_plugins.edge.costmodel import analyze, breakdown, predict
from autocomp_plugins.edge.devices import DEVICES, get_device

# --- tiny graphs, written node by node so every count is known ---------------------------------


def _init(name: str, shape: tuple[int, ...], dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(dtype), name)


def _model(nodes, inits, in_shape, out_name="y", elem=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", elem, list(in_shape))],
        [helper.make_tensor_value_info(out_name, elem, None)], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tiny_cnn() -> onnx.ModelProto:
    """conv 3x3 (3->8) + ReLU, pointwise (8->16), depthwise 3x3 (16), global pool, Gemm (16->10)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="pointwise"),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], pads=[1, 1, 1, 1], group=16, name="depthwise"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], transB=1, name="fc"),
    ]
    inits = [_init("w1", (8, 3, 3, 3)), _init("b1", (8,)), _init("w2", (16, 8, 1, 1)),
             _init("w3", (16, 1, 3, 3)), _init("w4", (10, 16)), _init("b4", (10,))]
    return _model(nodes, inits, (1, 3, 16, 16))


def _nodes_by_name(summary):
    return {n.name: n for n in summary.nodes}


def test_tiny_cnn_work_matches_hand_count():
    nodes = _nodes_by_name(analyze(_tiny_cnn(), {"x": (1, 3, 16, 16)}))
    # MACs = output elements x (input channels per group x kernel area)
    assert nodes["conv"].macs == (8 * 16 * 16) * (3 * 3 * 3)
    assert nodes["pointwise"].macs == (16 * 16 * 16) * 8
    assert nodes["depthwise"].macs == (16 * 16 * 16) * 9
    assert nodes["fc"].macs == 10 * 16
    assert nodes["conv"].flops == 2 * nodes["conv"].macs
    # Weights with bias; activations read (input) and written (output, ReLU fused in).
    assert nodes["conv"].weight_elements == 8 * 3 * 9 + 8
    assert nodes["conv"].activation_elements == 3 * 16 * 16 + 8 * 16 * 16
    assert nodes["relu"].fused_into == "conv"
    assert nodes["flatten"].kind == "free"
    assert nodes["pool"].kind == "pool"


def test_bytes_and_time_follow_the_roofline():
    summary = analyze(_tiny_cnn(), {"x": (1, 3, 16, 16)})
    device = get_device("raspberry-pi-4")
    conv = next(c for c in breakdown(summary, device) if c.work.name == "conv")
    assert conv.bytes == (8 * 3 * 9 + 8 + 3 * 16 * 16 + 8 * 16 * 16) * 4
    assert conv.memory_ms == pytest.approx(1e3 * conv.bytes / device.bandwidth_bytes_s)
    assert conv.compute_ms == pytest.approx(1e3 * conv.flops / (device.peak_ops["fp32"] * device.efficiency("conv")))
    assert conv.total_ms == pytest.approx(max(conv.compute_ms, conv.memory_ms) + device.overhead_us * 1e-3)
    total = predict(summary, {}, "raspberry-pi-4")
    assert total == pytest.approx(sum(c.total_ms for c in breakdown(summary, device)))


@pytest.mark.parametrize(
    ("weight_shape", "group", "kind"),
    [
        ((16, 16, 3, 3), 1, "conv"),
        ((16, 16, 1, 1), 1, "pointwise"),
        ((16, 1, 3, 3), 16, "depthwise"),
        ((32, 1, 3, 3), 16, "depthwise"),  # channel multiplier 2 is still one group per input channel
        ((16, 8, 3, 3), 2, "conv"),  # grouped, not depthwise
    ],
)
def test_convolution_kinds(weight_shape, group, kind):
    pad = weight_shape[-1] // 2
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[pad] * 4, name="c")],
                   [_init("w", weight_shape)], (1, 16, 8, 8))
    node = _nodes_by_name(analyze(model, {"x": (1, 16, 8, 8)}))["c"]
    assert node.kind == kind
    assert node.macs == weight_shape[0] * 8 * 8 * math.prod(weight_shape[1:])


def test_depthwise_is_slower_per_mac_than_dense():
    dense = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, name="c")],
                   [_init("w", (64, 64, 3, 3))], (1, 64, 32, 32))
    depthwise = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=64, name="c")],
                       [_init("w", (64, 1, 3, 3))], (1, 64, 32, 32))
    device = get_device("raspberry-pi-5")
    (d,) = breakdown(analyze(dense, {"x": (1, 64, 32, 32)}), device)
    (dw,) = breakdown(analyze(depthwise, {"x": (1, 64, 32, 32)}), device)
    assert dw.compute_ms / dw.flops > d.compute_ms / d.flops


def test_float16_graph_is_fp16_and_needs_an_fp16_device():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, name="c")]
    model = _model(nodes, [_init("w", (8, 8, 3, 3), np.float16)], (1, 8, 8, 8), elem=TensorProto.FLOAT16)
    summary = analyze(model, {"x": (1, 8, 8, 8)})
    assert summary.precisions == {"fp16"}
    assert predict(summary, {}, "raspberry-pi-5") > 0
    with pytest.raises(CandidateError, match="does not run fp16"):
        predict(summary, {}, "raspberry-pi-4")


def test_shapes_computed_at_run_time_are_resolved(tmp_path):
    """torch.chunk exports Shape -> Gather -> Div -> Slice; the conv after it must still be counted."""
    torch = pytest.importorskip("torch")

    class Chunky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            left, right = self.a(x).chunk(2, 1)
            return torch.cat((left, self.b(right)), 1)

    path = _export(torch, Chunky(), (1, 3, 8, 8), tmp_path)
    summary = analyze(path, {"input": (1, 3, 8, 8)})
    assert summary.macs == 8 * 64 * 3 + 4 * 64 * 4 * 9


def test_missing_or_wrong_input_shapes_are_errors():
    with pytest.raises(CandidateError, match="not inputs of the model"):
        analyze(_tiny_cnn(), {"x": (1, 3, 16, 16), "nope": (1,)})
    with pytest.raises(CandidateError, match="rank"):
        analyze(_tiny_cnn(), {"x": (1, 3, 16)})


# --- int8 (QDQ) graphs --------------------------------------------------------------------------


def _export(torch, module, shape, directory):
    """Export as autocomp does (TorchScript exporter, opset 17) into ``directory``."""
    import warnings

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{type(module).__name__}_{'x'.join(map(str, shape))}.onnx"
    with warnings.catch_warnings():  # the exporter's own deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.zeros(shape), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return path


def _small_cnn(torch, width: int):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


@pytest.fixture(scope="module")
def fp32_and_int8(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    directory = tmp_path_factory.mktemp("qdq")
    fp32 = _export(torch, _small_cnn(torch, 32), (1, 3, 32, 32), directory)

    class Batches(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    int8 = directory / "int8.onnx"
    quantize_static(str(fp32), str(int8), Batches(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return fp32, int8


def test_qdq_graph_is_int8_and_faster_on_an_int8_device(fp32_and_int8):
    fp32, int8 = fp32_and_int8
    shapes = {"input": (1, 3, 32, 32)}
    quantized = analyze(int8, shapes)
    assert {n.precision for n in quantized.nodes if n.costed and n.macs} == {"int8"}
    assert not any(n.costed for n in quantized.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert quantized.macs == analyze(fp32, shapes).macs
    for device in ("jetson-orin-nano", "raspberry-pi-5", "raspberry-pi-4"):
        assert predict(int8, shapes, device) < predict(fp32, shapes, device)


def test_int8_graph_on_jetson_nano_is_a_candidate_error(fp32_and_int8):
    target = edge.JetsonNano()
    with pytest.raises(CandidateError, match="does not run int8"):
        target.latency(fp32_and_int8[1], {"input": (1, 3, 32, 32)})


# --- targets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_registry():
    return load_registry(entry_points=[], extra_plugins=[("edge", edge)])


@pytest.mark.parametrize(
    ("name", "precisions"),
    [
        ("jetson-nano", {"fp32", "fp16"}),
        ("jetson-orin-nano", {"fp32", "fp16", "int8"}),
        ("jetson-orin-nx", {"fp32", "fp16", "int8"}),
        ("jetson-agx-orin", {"fp32", "fp16", "int8"}),
        ("raspberry-pi-4", {"fp32", "int8"}),
        ("raspberry-pi-5", {"fp32", "fp16", "int8"}),
    ],
)
def test_targets_are_registered_with_their_precisions(edge_registry, name, precisions):
    target = edge_registry.target(name)
    assert target.precisions == precisions
    assert target.measured is False
    assert target.description


def test_jetson_alias_is_the_orin_nano(edge_registry):
    assert edge_registry.target("jetson") is edge_registry.target("jetson-orin-nano")


def test_latency_is_a_prediction(edge_registry, fp32_and_int8):
    stats = edge_registry.target("jetson").latency(fp32_and_int8[0], {"input": (1, 3, 32, 32)})
    assert stats.measured is False
    assert stats.runs == 0
    assert stats.target == "jetson-orin-nano"
    assert stats.p50_ms == stats.p90_ms == stats.mean_ms > 0
    assert stats.facts["precisions_in_graph"] == ["fp32"]


def test_configure_overrides_calibration_and_rejects_unknown_options(edge_registry):
    target = edge_registry.target("raspberry-pi-5")
    assert target.configure({}) is target
    assert target.configure({"compute_scale": 0.5}).spec.compute_scale == 0.5
    with pytest.raises(TargetError, match="threads"):
        target.configure({"threads": 4})
    with pytest.raises(TargetError, match="positive"):
        target.configure({"overhead_us": -1})


def _three_convs(width: int) -> onnx.ModelProto:
    """conv 3x3 (3->16), conv 3x3 (16->width), conv 3x3 (width->16): the middle layer's width varies."""
    nodes = [helper.make_node("Conv", [i, w], [o], pads=[1] * 4, name=o)
             for i, w, o in (("x", "w1", "a"), ("a", "w2", "b"), ("b", "w3", "y"))]
    inits = [_init("w1", (16, 3, 3, 3)), _init("w2", (width, 16, 3, 3)), _init("w3", (16, width, 3, 3))]
    return _model(nodes, inits, (1, 3, 64, 64))


def test_prediction_grows_with_layer_width_on_a_compute_bound_device():
    device = get_device("raspberry-pi-4")
    totals = []
    for width in (8, 16, 32, 64):
        costs = breakdown(analyze(_three_convs(width), {"x": (1, 3, 64, 64)}), device)
        assert {c.bound for c in costs} == {"compute"}
        totals.append(sum(c.total_ms for c in costs))
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


# --- calibration ------------------------------------------------------------------------------


def test_committed_calibration_reproduces_every_published_row():
    rows, graphs = cal.load_published()
    assert len(rows) >= 10
    for row in rows:
        observation = cal.Observation(graphs[row.graph], row.latency_ms, row.precision_override)
        predicted = cal.predict_observation(DEVICES[row.device], observation)
        assert abs(predicted / row.latency_ms - 1) <= 0.25, (row, predicted)


def test_committed_calibration_is_what_the_fit_gives():
    rows, graphs = cal.load_published()
    for name, spec in cal.calibrate(rows, graphs).items():
        assert spec.compute_scale == pytest.approx(DEVICES[name].compute_scale, rel=0.01), name
        assert spec.overhead_us == pytest.approx(DEVICES[name].overhead_us, rel=0.05, abs=0.1), name


def test_correct_from_measurements_refits_the_scale():
    rows, graphs = cal.load_published()
    device = get_device("raspberry-pi-5")
    int8_graphs = [graphs[r.graph] for r in rows if r.precision == "int8" and r.model.startswith("resnet")]
    pairs = [(g, 1.6 * cal.predict_observation(device, cal.Observation(g, 1.0))) for g in int8_graphs]
    correction = cal.correct_from_measurements("raspberry-pi-5", pairs)
    assert correction.mean_abs_error_before_pct == pytest.approx(100 * (1 - 1 / 1.6), rel=1e-6)
    assert correction.mean_abs_error_after_pct < 2.0
    assert correction.scale_factor < 1.0
    assert correction.device.overhead_us == device.overhead_us
    with pytest.raises(ValueError, match="at least one"):
        cal.correct_from_measurements(device, [])
