"""The cpu target's latency predictor: features, calibration files, host matching. No timing here."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from autocomp_plugins import cpu_predictor as cp
from autocomp_plugins.cpu_target import CpuTarget

SHAPE = {"input": (1, 1, 32, 32)}


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    """Each test starts with an empty calibration cache, so only the shipped calibration is found."""
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))


def _digits(tmp_path: Path, width: int) -> Path:
    import torch

    from autocomp.export import export_onnx
    from autocomp_plugins.digits import DigitsResNet

    torch.manual_seed(0)
    return export_onnx(DigitsResNet(width=width), torch.zeros(1, 1, 32, 32), tmp_path / f"digits{width}.onnx")


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory, torch_threads):
    directory = tmp_path_factory.mktemp("digits")
    return {w: _digits(directory, w) for w in (8, 16, 32)}


# --- tiny graphs, counted by hand ----------------------------------------------------------------


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(dtype), name)


def _model(nodes, inits, in_shape=(1, 3, 16, 16)):
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tiny_fp32():
    """conv 3x3 (3->8) + ReLU (fused), PRelu (not fused by ONNX Runtime), pointwise (8->16),
    depthwise 3x3 (16), global pool, flatten, Gemm (16->10)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("PRelu", ["r1", "slope"], ["p1"], name="prelu"),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="pointwise"),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], pads=[1, 1, 1, 1], group=16, name="depthwise"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], transB=1, name="fc"),
    ]
    inits = [_init("w1", (8, 3, 3, 3)), _init("b1", (8,)), _init("slope", (8, 1, 1)), _init("w2", (16, 8, 1, 1)),
             _init("w3", (16, 1, 3, 3)), _init("w4", (10, 16)), _init("b4", (10,))]
    return _model(nodes, inits)


def test_tiny_fp32_features_match_hand_count():
    f = cp.graph_features(_tiny_fp32(), {"x": (1, 3, 16, 16)}, block=1)
    hw = 16 * 16
    assert f["run"] == 1
    assert f["conv.fp32.mmacs"] == pytest.approx(8 * hw * 27 / 1e6)
    assert f["pointwise.fp32.mmacs"] == pytest.approx(16 * hw * 8 / 1e6)
    assert f["depthwise.fp32.mmacs"] == pytest.approx(16 * hw * 9 / 1e6)
    assert f["gemm.fp32.mmacs"] == pytest.approx(10 * 16 / 1e6)
    # conv (with its ReLU), PRelu, pointwise, depthwise, pool, Gemm; Flatten is a shape node
    assert f["kernels.fp32"] == 6
    assert f["unfused.melems"] == pytest.approx(2 * 8 * hw / 1e6)  # PRelu reads and writes 8 x 16 x 16
    assert f["shape.kernels"] == 1
    assert f["weights.fp32.melems"] == pytest.approx((8 * 27 + 8 + 16 * 8 + 16 * 9 + 160 + 10) / 1e6)
    # pool reads 16 x 16 x 16 and writes 16
    assert f["other.fp32.melems"] == pytest.approx((16 * hw + 16) / 1e6)
    assert all(f[k] == 0 for k in f if ".int8." in k or k.startswith("qdq"))


def test_an_unfused_activation_larger_than_the_l1_cache_is_priced_apart():
    """The PRelu's 8 x 16 x 16 fp32 output (8 KiB) fits a 32 KiB L1 data cache, not a 4 KiB one."""
    fits = cp.graph_features(_tiny_fp32(), {"x": (1, 3, 16, 16)}, block=1, l1d=32 * 1024)
    spills = cp.graph_features(_tiny_fp32(), {"x": (1, 3, 16, 16)}, block=1, l1d=4 * 1024)
    assert fits["unfused.spill.melems"] == 0
    assert spills["unfused.spill.melems"] == pytest.approx(spills["unfused.melems"]) == pytest.approx(2 * 8 * 256 / 1e6)
    assert cp.l1d_bytes() >= 1024


def test_exponentiating_and_normalising_kernels_are_priced_apart():
    """Softmax and LayerNormalization cost more per element than a ReLU or an Add: their own feature."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["s"], axis=-1, name="softmax"),
             helper.make_node("LayerNormalization", ["s", "g"], ["y"], axis=-1, name="norm")]
    f = cp.graph_features(_model(nodes, [_init("g", (16,))]), {"x": (1, 3, 16, 16)}, block=1)
    n = 3 * 16 * 16
    assert f["other.fp32.melems"] == pytest.approx(2 * n / 1e6)  # the ReLU reads and writes
    assert f["transcendental.melems"] == pytest.approx(4 * n / 1e6)  # Softmax and LayerNorm, each n in, n out
    assert f["kernels.fp32"] == 3


def test_nchwc_padding_counts_the_channels_onnx_runtime_computes():
    """With 16-channel blocks (AVX-512) an fp32 convolution's output channels, and input channels of
    16 or more, are padded to whole blocks: 3 -> 24 computes 3 -> 32, 24 -> 24 computes 32 -> 32."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Conv", ["c2", "w3"], ["y"], pads=[1, 1, 1, 1], group=24, name="depthwise")]
    model = _model(nodes, [_init("w1", (24, 3, 3, 3)), _init("w2", (24, 24, 3, 3)), _init("w3", (24, 1, 3, 3))])
    hw = 16 * 16
    exact = cp.graph_features(model, {"x": (1, 3, 16, 16)}, block=1)
    padded = cp.graph_features(model, {"x": (1, 3, 16, 16)}, block=16)
    assert exact["conv.fp32.mmacs"] == pytest.approx(hw * (24 * 27 + 24 * 24 * 9) / 1e6)
    assert padded["conv.fp32.mmacs"] == pytest.approx(hw * (32 * 27 + 32 * 32 * 9) / 1e6)
    assert padded["depthwise.fp32.mmacs"] == pytest.approx(hw * 32 * 9 / 1e6)
    assert cp.graph_features(model, {"x": (1, 3, 16, 16)}, block=8) == exact  # 24 is a whole number of 8-blocks


def test_padded_macs_are_the_ones_onnx_runtime_computes(tmp_path):
    """The filters in ONNX Runtime's optimised graph (padded by its NCHWc transformer where it applies)
    hold the MACs the features count, on this host: 3 -> 24, 24 -> 24 and a 24-channel depthwise."""
    import onnx

    from autocomp.ort import optimised_model

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Conv", ["c2", "w3"], ["y"], pads=[1, 1, 1, 1], group=24, name="depthwise")]
    model = _model(nodes, [_init("w1", (24, 3, 3, 3)), _init("w2", (24, 24, 3, 3)), _init("w3", (24, 1, 3, 3))])
    onnx.save(model, str(tmp_path / "convs.onnx"))
    optimised = optimised_model(tmp_path / "convs.onnx", tmp_path / "optimised.onnx")
    weights = {i.name: list(i.dims) for i in optimised.graph.initializer}
    filters = [weights[n.input[1]] for n in optimised.graph.node if n.op_type == "Conv"]
    assert len(filters) == 3
    run = sum(np.prod(w) for w in filters) * 16 * 16 / 1e6  # every output pixel meets the whole filter
    f = cp.graph_features(model, {"x": (1, 3, 16, 16)})
    assert f["conv.fp32.mmacs"] + f["depthwise.fp32.mmacs"] == pytest.approx(run)


def test_nchwc_block_is_what_onnx_runtime_uses_on_this_cpu():
    """MLAS blocks channels by 16 with AVX-512 and by 8 with AVX2 (x86 only)."""
    from autocomp.ort import cpu_flags

    flags = cpu_flags()
    expected = 16 if "avx512f" in flags else 8 if "avx2" in flags else None
    if expected is None:
        pytest.skip("not an x86 CPU with AVX2 or AVX-512")
    assert cp.nchwc_block() == expected


@pytest.mark.parametrize("text, flags", [
    ("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t: sse\n",
     {"fpu", "avx2", "avx512f"}),  # x86: the first processor's "flags"
    ("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n", {"fp", "asimd", "asimddp"}),  # Arm
    (None, set()),  # no /proc/cpuinfo (not Linux)
])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path, text, flags):
    from autocomp.ort import cpu_flags

    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert cpu_flags(path) == flags


def _tiny_qdq(cin: int = 3, cout: int = 8):
    """x -> Q -> DQ -> Conv(int8 weight) -> Q -> DQ -> Relu -> Q -> DQ -> y, as quantize_static writes it.

    ONNX Runtime runs: QuantizeLinear(x), QLinearConv, then a DequantizeLinear -> QuantizeLinear
    requantization (the ReLU is dropped), and the final DequantizeLinear: four Q/DQ kernels.
    """
    def q(src, dst, name):
        return helper.make_node("QuantizeLinear", [src, "s", "z"], [dst], name=name)

    def dq(src, dst, name):
        return helper.make_node("DequantizeLinear", [src, "s", "z"], [dst], name=name)

    nodes = [
        q("x", "xq", "q_in"), dq("xq", "xd", "dq_in"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq_w"),
        helper.make_node("Conv", ["xd", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        q("c", "cq", "q_conv"), dq("cq", "cd", "dq_conv"),
        helper.make_node("Relu", ["cd"], ["r"], name="relu"),
        q("r", "rq", "q_relu"), dq("rq", "y", "dq_out"),
    ]
    wq = numpy_helper.from_array(np.ones((cout, cin, 3, 3), dtype=np.int8), "wq")
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z"), wq,
             numpy_helper.from_array(np.array(0.01, np.float32), "ws")]
    return _model(nodes, inits)


def test_tiny_qdq_features_match_hand_count():
    f = cp.graph_features(_tiny_qdq(), {"x": (1, 3, 16, 16)}, block=1)
    assert f["conv.int8.mmacs"] == pytest.approx(8 * 256 * 27 / 1e6) and f["generic.int8.mmacs"] == 0
    # on x86 (NCHWc blocks) a 3 -> 8 int8 convolution is too narrow for the symmetric int8 kernels
    generic = cp.graph_features(_tiny_qdq(), {"x": (1, 3, 16, 16)}, block=16)
    assert generic["conv.int8.mmacs"] == 0 and generic["generic.int8.mmacs"] == pytest.approx(8 * 256 * 27 / 1e6)
    assert generic["generic.int8.melems"] == pytest.approx((3 + 8) * 256 / 1e6)
    # a 4 -> 24 one runs them, with output channels in blocks of 16: 24 -> 32
    packed = cp.graph_features(_tiny_qdq(4, 24), {"x": (1, 4, 16, 16)}, block=16)
    assert packed["conv.int8.mmacs"] == pytest.approx(32 * 256 * 36 / 1e6) and packed["generic.int8.mmacs"] == 0
    assert f["kernels.int8"] == 1 and f["kernels.fp32"] == 0
    assert f["qdq.kernels"] == 4  # Q(x), DQ(conv) -> Q(relu) requantization, DQ(output)
    assert f["qdq.melems"] == pytest.approx((3 * 256 + 3 * 8 * 256) / 1e6)


@pytest.mark.parametrize("cout, cin_per_group, group, block, generic", [
    (16, 4, 1, 16, False), (20, 16, 1, 16, False), (24, 16, 1, 8, False), (256, 128, 1, 16, False),
    (12, 16, 1, 16, True),  # fewer than 16 output channels
    (18, 16, 1, 16, True),  # output channels not a multiple of 4
    (20, 16, 1, 8, True),  # ... of 8 (AVX2)
    (16, 3, 1, 16, True),  # input channels not a multiple of 4 (an RGB stem)
    (32, 1, 32, 16, False), (24, 1, 24, 16, True),  # depthwise: channels a multiple of 16
    (32, 4, 8, 16, True),  # grouped, not depthwise
    (8, 3, 1, 1, False),  # off x86 the rule is not known
])
def test_which_int8_convolutions_miss_the_symmetric_int8_kernels(cout, cin_per_group, group, block, generic):
    """MLAS's MlasConvSymPackWSize conditions (onnxruntime mlas/lib/convsym.cpp)."""
    assert cp.int8_conv_is_generic(cout, cin_per_group, group, block) is generic


def test_a_relu_after_int8_runs_in_float_unless_quantized_again():
    """int8 conv -> Q -> DQ -> Relu -> output: ONNX Runtime folds the ReLU into the QLinearConv only
    when a QuantizeLinear reads it; here it is a float kernel over the conv's output, in NHWC."""
    model = _tiny_qdq()
    nodes = list(model.graph.node)[:-2]  # drop q_relu and dq_out
    nodes[-1].output[0] = "y"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    f = cp.graph_features(model, {"x": (1, 3, 16, 16)}, block=1)
    assert f["kernels.int8"] == 1 and f["kernels.fp32"] == 1
    assert f["unfused.int8.melems"] == pytest.approx(2 * 8 * 256 / 1e6)  # float, after an int8 layer
    assert f["qdq.kernels"] == 2  # Q(x) and the DQ after the conv (its Q folds into the QLinearConv)


@pytest.mark.parametrize("make", [_tiny_fp32, _tiny_qdq])
def test_analysis_agrees_with_edge_cost_model(make):
    from autocomp_plugins._cpu_features import _analyze
    from autocomp_plugins.edge.costmodel import analyze

    shapes = {"x": (1, 3, 16, 16)}
    assert tuple(_analyze(make(), shapes).work) == analyze(make(), shapes).nodes


# --- predictions -------------------------------------------------------------------------------


def test_predictions_positive_and_monotone_in_width(digits_models):
    calibration = cp.load_calibration(threads=1)
    predicted = [cp.predict_latency_ms(digits_models[w], SHAPE, calibration) for w in (8, 16, 32)]
    assert all(p > 0 for p in predicted)
    assert predicted == sorted(predicted) and len(set(predicted)) == 3


def test_prediction_runs_no_model(digits_models, monkeypatch):
    """Cheap by construction: the estimate comes from the graph; no ONNX Runtime session is made."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("predict_latency must not create an inference session")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    assert CpuTarget().predict_latency(digits_models[8], SHAPE) > 0


def test_cpu_target_predict_latency_returns_float(digits_models):
    value = CpuTarget().predict_latency(digits_models[16], SHAPE)
    assert isinstance(value, float) and value > 0


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    truth = {"run": 0.02, "kernels.fp32": 0.001, "conv.fp32.mmacs": 0.03}
    rows = [{"run": 1.0, "kernels.fp32": float(rng.integers(5, 50)), "conv.fp32.mmacs": float(rng.uniform(1, 90))}
            for _ in range(12)]
    latencies = [sum(truth[k] * r[k] for k in truth) for r in rows]
    fitted = cp.fit_coefficients(rows, latencies)
    assert {k: round(v, 6) for k, v in fitted.items() if v} == truth


# --- calibration files ------------------------------------------------------------------------


def test_shipped_calibration_loads():
    calibrations = cp.read_calibrations(cp.SHIPPED_CALIBRATION)
    assert calibrations and all(set(c.coefficients) <= set(cp.FEATURES) for c in calibrations)
    shipped = calibrations[0]
    for key in ("cpu_model", "onnxruntime", "isa"):
        assert shipped.host[key]
    loaded = cp.load_calibration(threads=shipped.threads, host=shipped.host)
    assert loaded.source == str(cp.SHIPPED_CALIBRATION) and loaded.coefficients == shipped.coefficients


def test_autocomp_targets_says_how_close_the_cpu_predictor_came():
    shipped = cp.read_calibrations(cp.SHIPPED_CALIBRATION)[0]
    share = shipped.fit["cross_validated_within_10pct"]
    text = CpuTarget().validation
    assert text.startswith("measured; ") and f"{100 * share:.0f} % within 10 %" in text
    assert ("this host" in text) == shipped.matches(cp.host_identity())


def test_cached_calibration_for_this_host_is_preferred(digits_models):
    host = cp.host_identity()
    mine = cp.CpuCalibration(host=host, threads=1, coefficients={"run": 7.0}, fit={"feature_set": cp.FEATURE_SET})
    path = cp.write_calibrations(cp.cache_path(host, 1), [mine])
    loaded = cp.load_calibration(threads=1)
    assert loaded.source == str(path) and loaded.coefficients == {"run": 7.0}
    assert CpuTarget().predict_latency(digits_models[8], SHAPE) == pytest.approx(7.0)


def test_a_cached_calibration_fitted_on_the_p50_gives_way_to_the_shipped_one(caplog):
    host = cp.host_identity()
    old = cp.CpuCalibration(host=host, threads=1, coefficients={"run": 7.0},
                            fit={"target": "median of round p50s, TimingPolicy() defaults"})
    cp.write_calibrations(cp.cache_path(host, 1), [old])
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        loaded = cp.load_calibration(threads=1)
    assert loaded.source == str(cp.SHIPPED_CALIBRATION) and "fitted on the p50" in caplog.text


def test_a_cached_calibration_of_older_features_gives_way_to_the_shipped_one(caplog):
    """Coefficients fitted to what the features counted before (no channel padding ...) would
    misprice every graph; the shipped calibration, fitted to the current features, is used."""
    host = cp.host_identity()
    old = cp.CpuCalibration(host=host, threads=1, coefficients={"run": 7.0}, fit={"target": cp.FIT_TARGET})
    cp.write_calibrations(cp.cache_path(host, 1), [old])
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        loaded = cp.load_calibration(threads=1)
    assert loaded.source == str(cp.SHIPPED_CALIBRATION) and "older version" in caplog.text
    assert loaded.fit["feature_set"] == cp.FEATURE_SET  # the shipped one is current


def test_a_cached_calibration_measured_with_another_block_or_l1d_is_another_hosts(caplog):
    """The features depend on the NCHWc block and the L1d size: a calibration that records others is
    passed over (one recording this host's is used; one recording none loads as before)."""
    host = cp.host_identity()
    here = cp.host_feature_facts()
    for facts in ({"nchwc_block": here["nchwc_block"] + 8}, {"l1d_bytes": here["l1d_bytes"] // 2}):
        other = cp.CpuCalibration(host=host, threads=1, coefficients={"run": 7.0},
                                  fit={"feature_set": cp.FEATURE_SET, **here, **facts})
        cp.write_calibrations(cp.cache_path(host, 1), [other])
        with caplog.at_level(logging.WARNING, logger="autocomp"):
            loaded = cp.load_calibration(threads=1)
        assert loaded.source == str(cp.SHIPPED_CALIBRATION) and "another CPU" in caplog.text
        assert str(next(iter(facts.values()))) in caplog.text
    mine = cp.CpuCalibration(host=host, threads=1, coefficients={"run": 7.0},
                             fit={"feature_set": cp.FEATURE_SET, **here})
    path = cp.write_calibrations(cp.cache_path(host, 1), [mine])
    assert cp.load_calibration(threads=1).source == str(path)


def test_a_shipped_calibration_measured_with_another_l1d_is_another_hosts(tmp_path, caplog):
    here = cp.host_feature_facts()
    shipped = cp.CpuCalibration(host=cp.host_identity(), threads=1, coefficients={"run": 7.0},
                                fit={**here, "l1d_bytes": here["l1d_bytes"] * 2})
    path = cp.write_calibrations(tmp_path / "shipped.json", [shipped])
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        loaded = cp.load_calibration(threads=1, shipped=path)
    assert loaded.coefficients == {"run": 7.0}  # the only one there is, used anyway
    assert "another host" in caplog.text and f"l1d_bytes: {2 * here['l1d_bytes']} there" in caplog.text


def test_other_host_logs_a_warning_and_still_predicts(digits_models, caplog):
    host = {**cp.host_identity(), "cpu_model": "Imaginary CPU 9000"}
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        calibration = cp.load_calibration(threads=1, host=host)
    assert "another host" in caplog.text and "Imaginary CPU 9000" in caplog.text
    assert cp.predict_latency_ms(digits_models[8], SHAPE, calibration) > 0


def test_thread_count_without_calibration_warns(caplog, monkeypatch):
    shipped = cp.read_calibrations(cp.SHIPPED_CALIBRATION)[0]
    monkeypatch.setattr(cp, "host_identity", lambda: dict(shipped.host))
    monkeypatch.setattr(cp, "host_feature_facts", lambda: {k: shipped.fit.get(k) for k in cp.HOST_FEATURE_FACTS})
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        calibration = cp.load_calibration(threads=64)
    assert calibration.threads != 64 and "not 64" in caplog.text


def test_calibration_rejects_bad_coefficients():
    with pytest.raises(ValueError, match="unknown features"):
        cp.CpuCalibration(host={}, threads=1, coefficients={"flops": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        cp.CpuCalibration(host={}, threads=1, coefficients={"run": -1.0})


def test_calibration_round_trips_through_json(tmp_path):
    calibration = cp.CpuCalibration(host={"cpu_model": "x"}, threads=2, coefficients={"run": 0.5}, fit={"models": 3})
    path = cp.write_calibrations(tmp_path / "c.json", [calibration])
    (loaded,) = cp.read_calibrations(path)
    assert loaded.to_dict() == calibration.to_dict()


def test_a_calibration_on_few_candidates_warns(tmp_path, monkeypatch, caplog):
    """Ten candidates for the predictor's coefficients fit those ten and little else: calibrating
    on them works and says so. (Timing is not what is tested here: the measurements are given.)"""
    from autocomp_plugins import cpu_calibrate as cc

    specs = [cc.CandidateSpec("digits", (("width", 8),), (1, 1, 16, 16), 0.5, "fp32", seed) for seed in range(10)]
    monkeypatch.setattr(cc, "candidate_specs", lambda count, seed=0: specs[:count])
    monkeypatch.setattr(cc, "measure_candidates", lambda paths, shapes, **kw: [
        {"min_ms": 0.05 + 0.01 * i} for i in range(len(paths))])
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        calibration = cc.calibrate_cpu(count=10, work_dir=tmp_path, write=False)
    assert "10 candidates for" in caplog.text and "recommended" in caplog.text
    assert calibration.fit["models"] == 10 and calibration.fit["feature_set"] == cp.FEATURE_SET
    assert {k: calibration.fit[k] for k in cp.HOST_FEATURE_FACTS} == cp.host_feature_facts()
    assert 0 <= calibration.fit["cross_validated_within_10pct"] <= 1  # `autocomp targets` shows it


def test_out_of_fold_predictions_never_see_their_own_measurement():
    """Cross-validation: latencies exactly linear in the features are predicted exactly from the
    other folds, and a wild measurement does not move its own prediction (it moves the others')."""
    rows = [{"run": 1.0, "conv.fp32.mmacs": float(m)} for m in range(1, 21)]
    latencies = [0.01 + 0.02 * r["conv.fp32.mmacs"] for r in rows]
    folds = cp.random_folds(len(rows), 5, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(rows)))
    predicted = cp.out_of_fold_ms(rows, latencies, folds)
    assert predicted == pytest.approx(latencies, rel=1e-6)
    wild = list(latencies)
    wild[7] *= 10
    moved = cp.out_of_fold_ms(rows, wild, folds)
    assert moved[7] == pytest.approx(latencies[7], rel=1e-6)
    assert any(abs(m / p - 1) > 1e-3 for m, p in zip(moved, predicted))  # relative error bounds its pull


def test_autocomp_calibrate_cpu_reports_its_cross_validated_figure(tmp_path, monkeypatch, capsys):
    """`autocomp calibrate --target cpu` fits, stores where later searches look, and says how close
    the fit came out of sample; without --count it measures the default number of candidates.
    (The measurements are given: timing is not what is tested here.)"""
    from autocomp.cli import main
    from autocomp_plugins import cpu_calibrate as cc

    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path))
    specs = [cc.CandidateSpec("digits", (("width", 8),), (1, 1, 16, 16), 0.5, "fp32", seed) for seed in range(12)]
    monkeypatch.setattr(cc, "candidate_specs", lambda count, seed=0: specs[:count])
    monkeypatch.setattr(cc, "measure_candidates", lambda paths, shapes, **kw: [
        {"min_ms": 0.05 + 0.01 * i} for i in range(len(paths))])
    assert main(["calibrate", "--target", "cpu", "--count", "12"]) == 0
    said = " ".join(capsys.readouterr().err.split())  # messages go to stderr
    assert "calibrated for this host on 12 candidates" in said and "cross-validated" in said
    stored = cp.cache_path(cp.host_identity(), 1)
    assert stored.is_file() and str(tmp_path) in str(stored)

    asked = []
    monkeypatch.setattr(cc, "calibrate_cpu", lambda **kw: asked.append(kw["count"]) or cp.load_calibration(threads=1))
    assert main(["calibrate", "--target", "cpu", "--json"]) == 0
    assert asked == [cc.DEFAULT_CANDIDATES]


def test_autocomp_calibrate_cpu_says_why_when_too_few_candidates_build(tmp_path, monkeypatch, capsys):
    """Candidates that fail to build (a broken install, a full disk) are skipped with a warning each;
    when too few are left to fit, the command says so, points at those warnings, exits 4 (an
    infrastructure error, not the user's input) and writes no calibration."""
    from autocomp.cli import main
    from autocomp.errors import CandidateError
    from autocomp_plugins import cpu_calibrate as cc

    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path))
    specs = [cc.CandidateSpec("digits", (("width", 8),), (1, 1, 16, 16), 0.5, "fp32", seed) for seed in range(12)]
    monkeypatch.setattr(cc, "candidate_specs", lambda count, seed=0: specs[:count])
    built = cc.build_candidate

    def build_some(spec, directory):  # 9 of the 12 fail, as with a broken exporter
        if spec.seed >= 3:
            raise CandidateError(f"export failed for seed {spec.seed}")
        return built(spec, directory)

    monkeypatch.setattr(cc, "build_candidate", build_some)
    monkeypatch.setattr(cc, "measure_candidates", lambda *a, **kw: pytest.fail("nothing is measured"))
    assert main(["calibrate", "--target", "cpu", "--count", "12"]) == 4
    said = " ".join(capsys.readouterr().err.split())
    assert "only 3 of 12 calibration candidates could be built" in said and "at least 10" in said
    assert "export failed for seed 11" in said and "nothing was written" in said
    assert not cp.cache_path(cp.host_identity(), 1).exists()


@pytest.mark.parametrize("option, value, said", [
    ("--count", "5", "--count must be at least 10 (the fewest candidates a calibration is fitted on), but got 5"),
    ("--count", "0", "but got 0; pass --count 10 or more"),
    ("--threads", "0", "--threads must be at least 1, but got 0"),
])
def test_autocomp_calibrate_cpu_checks_its_options_before_any_work(monkeypatch, capsys, option, value, said):
    """A bad --count or --threads is a usage error (exit 2) that names the rule, the value and the
    remedy, before a single candidate is built."""
    from autocomp.cli import main
    from autocomp_plugins import cpu_calibrate as cc

    def refuse(*args, **kwargs):
        raise AssertionError("no candidate may be built before the options are checked")

    monkeypatch.setattr(cc, "candidate_specs", refuse)
    assert main(["calibrate", "--target", "cpu", option, value]) == 2
    assert said in " ".join(capsys.readouterr().err.split())
