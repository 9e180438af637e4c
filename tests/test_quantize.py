"""Per-layer precision: int8, fp16 and int4 layers in one graph that runs, close to fp32, with the
precisions the target runs; the fp16 evaluation twin rounds exactly where fp16 would."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from autocomp.errors import SpaceError
from autocomp.method import EVALUATION_ARTIFACT, BaseModelInfo, CandidateContext
from autocomp.ort import run_batches
from autocomp_plugins._precision import convert_float16, detach_from_qdq, int8_glue, layer_table
from autocomp_plugins.quantize import QuantizeConfig, QuantizeMethod

from .conftest import unmeasured_target

ALL = frozenset({"fp32", "fp16", "int8", "int4"})
#: Relative L2 error of the output against fp32 allowed per setting, on random-weight tiny models
#: (measured: fp16 <= 0.001, int8 <= 0.03, int4 <= 0.11, mixed <= 0.03).
TOLERANCE = {"fp16": 0.005, "int8": 0.08, "int4": 0.25, "mixed": 0.15}


def _ctx(tmp_path: Path, inputs: torch.Tensor, precisions=ALL) -> CandidateContext:
    work = SimpleNamespace(train=SimpleNamespace(inputs=inputs))
    return CandidateContext(workload=work, teacher=None, target=unmeasured_target(precisions=precisions), work_dir=tmp_path, seed=0)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    from autocomp.export import export_onnx

    return export_onnx(model.eval(), example, path)


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory, torch_threads):
    """fp32 exports of the tiny ResNet-20 (Conv, residual Add, Gemm) and tiny ViT (MatMuls with and
    without constant weights, Gemm head), with 32 random inputs each."""
    from autocomp.zoo import build, example_input, tiny_kwargs

    root = tmp_path_factory.mktemp("zoo")
    models = {}
    for name in ("resnet20", "vit"):
        torch.manual_seed(0)
        example = example_input(name, tiny=True)
        path = _export(build(name, **tiny_kwargs(name)), example, root / f"{name}.onnx")
        inputs = torch.randn(32, *example.shape[1:], generator=torch.Generator().manual_seed(1))
        models[name] = (path, inputs)
    return models


def _setting(path: Path, kind: str) -> dict[str, str]:
    """One precision for every layer, or (``mixed``) fp32/fp16/int8/int4 in turn; int4 only where it applies."""
    setting = {}
    for i, (name, layer) in enumerate(layer_table(onnx.load(str(path))).items()):
        precision = ("fp32", "fp16", "int8", "int4")[i % 4] if kind == "mixed" else kind
        if precision == "int4" and layer.int4_unsupported:
            precision = "int8" if kind == "mixed" else "fp32"
        setting[name] = precision
    return setting


def _precision_of(model: onnx.ModelProto, node_name: str) -> str:
    """What the graph does with the layer exported as ``node_name``: ``fp16 emulated`` is an fp32
    node whose input went through a Cast to float16 and back."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    if node_name not in nodes:
        assert nodes[f"{node_name}_Q4"].op_type == "MatMulNBits"
        return "int4"
    node = nodes[node_name]
    fed = [producer[i].op_type if i in producer else "initializer" for i in node.input[:2]]
    if fed == ["DequantizeLinear", "DequantizeLinear"]:
        return "int8"
    assert "DequantizeLinear" not in fed, f"{node_name} is half quantized: {fed}"
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(inferred.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    if {types.get(i) for i in node.input} == {TensorProto.FLOAT16}:
        return "fp16"
    assert TensorProto.FLOAT16 not in {types.get(i) for i in node.input}, f"{node_name} mixes float types"
    first = producer.get(node.input[0])
    if first is not None and first.op_type == "Cast" and first.input[0] in producer:
        before = producer[first.input[0]]
        if before.op_type == "Cast" and helper.get_attribute_value(before.attribute[0]) == TensorProto.FLOAT16:
            return "fp16 emulated"
    return "fp32"


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"bits": [6, 8]}, "quantize.bits"),
        ({"bits": []}, "quantize.bits"),
        ({"bits": ["8"]}, "quantize.bits"),
        ({"bits": [True]}, "quantize.bits"),
        ({"calibration_samples": 0}, "quantize.calibration_samples"),
        ({"per_channel": "yes"}, "quantize.per_channel"),
        ({"reduce_range": "sometimes"}, "quantize.reduce_range"),
        ({"int4_block_size": 24}, "quantize.int4_block_size"),
        ({"int4_block_size": 8}, "quantize.int4_block_size"),
        ({"precision": "int8"}, "quantize"),
    ],
)
def test_bad_config_names_file_and_key(table, key):
    with pytest.raises(SpaceError) as info:
        QuantizeMethod().parse_config(table, "file.toml")
    assert info.value.source == "file.toml" and info.value.key == key
    assert str(info.value).startswith(f"file.toml: [{key}] ")


def test_config_orders_precisions_least_compressed_first():
    config = QuantizeMethod().parse_config({"bits": [4, 32, 8, 16, 8]}, "file.toml")
    assert config.precisions() == ("fp32", "fp16", "int8", "int4")
    assert QuantizeMethod().parse_config({"bits": 8}, "file.toml").precisions() == ("int8",)
    assert QuantizeConfig().precisions() == ("fp32", "fp16", "int8", "int4")


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precisions", "bits", "conv", "linear"),
    [
        ({"fp32", "int8"}, None, ("fp32", "int8"), ("fp32", "int8")),  # this CPU
        ({"fp32", "fp16"}, None, ("fp32", "fp16"), ("fp32", "fp16")),  # Jetson Nano
        ({"fp32", "fp16", "int8"}, None, ("fp32", "fp16", "int8"), ("fp32", "fp16", "int8")),  # Orin
        ({"fp32", "fp16", "int8", "int4"}, None, ("fp32", "fp16", "int8"), ("fp32", "fp16", "int8", "int4")),
        ({"fp32", "int4"}, None, None, ("fp32", "int4")),
        ({"fp32", "fp16", "int8", "int4"}, [8, 32], ("fp32", "int8"), ("fp32", "int8")),
        ({"fp32"}, None, None, None),
    ],
)
def test_choices_are_intersected_with_the_target(zoo_models, precisions, bits, conv, linear):
    path, inputs = zoo_models["vit"]
    method = QuantizeMethod()
    config = method.parse_config({} if bits is None else {"bits": bits}, "file.toml")
    info = BaseModelInfo(model=None, example_input=inputs[:1], onnx_path=path, target=unmeasured_target(precisions=precisions))
    params = {p.name: p for p in method.parameters(config, info)}
    expected = {
        "patch_embed.proj": conv,  # Conv: no int4
        "blocks.0.attn.qkv": linear,  # MatMul with a constant weight
        "head": linear,  # Gemm
        "blocks.0.attn": conv,  # q @ k^T: no constant weight, no int4
    }
    for name, choices in expected.items():
        assert (params[name].choices if name in params else None) == choices, name
    # every parameter concerns the module its node came from, also the second attention MatMul of a
    # block, which is named after its node because its module name is taken
    table = layer_table(onnx.load(str(path)))
    assert {name: p.module for name, p in params.items()} == {name: table[name].module for name in params}
    if conv is not None:  # layers without a constant weight have parameters
        assert params["/blocks.0/attn/MatMul_1"].module == "blocks.0.attn"


# --- artifacts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int8", "fp16", "int4", "mixed"])
@pytest.mark.parametrize("model_name", ["resnet20", "vit"])
def test_setting_gives_runnable_artifact_close_to_fp32(zoo_models, tmp_path, model_name, kind):
    path, inputs = zoo_models[model_name]
    setting = _setting(path, kind)
    ctx = _ctx(tmp_path, inputs)
    root_handlers = list(logging.getLogger().handlers)
    out = QuantizeMethod().apply(path, setting, QuantizeConfig(), ctx)

    assert logging.getLogger().handlers == root_handlers  # ORT's int4 module configures no logging of ours
    assert ctx.skipped == []
    expected = run_batches(path, inputs.numpy())
    deployable = run_batches(out, inputs.numpy())  # every artifact loads and runs in ONNX Runtime
    evaluation = Path(ctx.notes.get(EVALUATION_ARTIFACT, out))
    assert (EVALUATION_ARTIFACT in ctx.notes) == ("fp16" in setting.values())
    metric_output = run_batches(evaluation, inputs.numpy())
    assert _relative_error(metric_output, expected) < TOLERANCE[kind]
    assert _relative_error(deployable, expected) < TOLERANCE[kind]

    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    table = layer_table(onnx.load(str(path)))
    got = {name: _precision_of(graph, table[name].node) for name in setting}
    assert got == setting
    for precision in ("fp16", "int8", "int4"):
        assert ctx.notes[f"{precision}_layers"] == sum(p == precision for p in setting.values())
    if EVALUATION_ARTIFACT in ctx.notes:  # the twin is float32 throughout, same int8/int4 layers
        twin = onnx.load(str(evaluation))
        assert all(i.data_type != TensorProto.FLOAT16 for i in twin.graph.initializer)
        twin_precisions = {name: _precision_of(twin, table[name].node) for name in setting}
        assert twin_precisions == {n: ("fp16 emulated" if p == "fp16" else p) for n, p in setting.items()}


def test_one_precision_for_the_whole_model(zoo_models, tmp_path):
    """per_layer = false: a single choice, among the precisions every layer can take (the ViT's
    convolution and attention products cannot be int4), applied to every layer."""
    path, inputs = zoo_models["vit"]
    method = QuantizeMethod()
    config = method.parse_config({"per_layer": False}, "file.toml")
    info = BaseModelInfo(model=None, example_input=inputs[:1], onnx_path=path, target=unmeasured_target(precisions=ALL))
    (param,) = method.parameters(config, info)
    assert (param.name, param.choices, param.neutral) == ("all_layers", ("fp32", "fp16", "int8"), "fp32")
    ctx = _ctx(tmp_path, inputs)
    out = method.apply(path, {"all_layers": "int8"}, config, ctx)
    table = layer_table(onnx.load(str(path)))
    graph = onnx.load(str(out))
    assert {_precision_of(graph, layer.node) for layer in table.values()} == {"int8"}
    assert ctx.notes["int8_layers"] == len(table) and ctx.skipped == []
    # int4 or fp32 only: the convolution cannot take int4, so no whole-model choice remains
    assert method.parameters(method.parse_config({"per_layer": False, "bits": [4, 32]}, "file.toml"), info) == []
    with pytest.raises(SpaceError, match="per_layer"):
        method.parse_config({"per_layer": "no"}, "file.toml")


def _kernels(path: Path, tmp_path: Path) -> Counter:
    """Op types of ``path``'s graph as ONNX Runtime runs it here (fully optimised), counting only
    the QuantizeLinear/DequantizeLinear nodes of activations (not of constants)."""
    from autocomp.ort import optimised_model

    graph = optimised_model(path, tmp_path / "optimised.onnx").graph
    constants = {i.name for i in graph.initializer}
    return Counter(n.op_type for n in graph.node
                   if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.input[0] not in constants)


def test_an_all_int8_cnn_runs_in_int8_from_input_to_output(zoo_models, tmp_path):
    """The ReLUs, residual Adds and pooling between int8 layers are quantized with them, so ONNX
    Runtime runs the whole ResNet in int8: one QuantizeLinear at the input, one DequantizeLinear at
    the output, nothing in float between (with the layers alone, every ReLU and Add sat between a
    DequantizeLinear and a QuantizeLinear; benchmarks/int8_glue.md)."""
    path, inputs = zoo_models["resnet20"]
    out = QuantizeMethod().apply(path, {"all_layers": "int8"}, QuantizeConfig(), _ctx(tmp_path, inputs))
    kernels = _kernels(out, tmp_path)
    assert (kernels["QuantizeLinear"], kernels["DequantizeLinear"]) == (1, 1), kernels
    assert not {"Conv", "Relu", "Add", "GlobalAveragePool"} & kernels.keys(), kernels
    assert kernels["QLinearAdd"] == 9 and kernels["QLinearGlobalAveragePool"] == 1


def test_a_float_layer_after_an_int8_one_reads_the_float_relu(zoo_models, tmp_path):
    """A ReLU between an int8 layer and one kept in float stays a float op the float layer reads:
    quantized, ONNX Runtime would fold it into the int8 layer's output quantization and the float
    layer would read that layer's output without the ReLU, or its int8-rounded copy."""
    path, inputs = zoo_models["resnet20"]
    table = layer_table(onnx.load(str(path)))
    setting = {name: "fp32" if name == "layer1.0.conv1" else "int8" for name in table}
    out = QuantizeMethod().apply(path, setting, QuantizeConfig(), _ctx(tmp_path, inputs))
    graph = onnx.load(str(out))
    producer = {o: n for n in graph.graph.node for o in n.output}
    node = next(n for n in graph.graph.node if n.name == table["layer1.0.conv1"].node)
    assert producer[node.input[0]].op_type == "Relu"
    assert {n: _precision_of(graph, layer.node) for n, layer in table.items()} == setting
    expected = run_batches(path, inputs.numpy())
    assert _relative_error(run_batches(out, inputs.numpy()), expected) < TOLERANCE["mixed"]


def _graph(nodes: list[tuple[str, str, list[str], str]], outputs=("y",)) -> onnx.ModelProto:
    """A graph from ``(op, name, inputs, output)``; names starting with ``w`` are constants. Only
    its structure matters here (the passes below read names, ops and edges)."""
    constants = sorted({i for _, _, inputs, _ in nodes for i in inputs if i.startswith("w")})
    graph = helper.make_graph(
        [helper.make_node(op, inputs, [out], name=name) for op, name, inputs, out in nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [helper.make_tensor(c, TensorProto.FLOAT, [1], [0.5]) for c in constants])
    return helper.make_model(graph)


def test_glue_is_only_what_lies_between_int8_layers():
    """An op is quantized with the int8 layers only on a path from int8 to int8. Dropping one op
    can drop others on both sides of it: here relu_a feeds a float layer, so it stays float; the Add
    then reads a float input and stays float, and with it relu_c after it and relu_b before it
    (relu_b would feed the float Add). The separate chain conv_d -> relu_d -> conv_e keeps its ReLU;
    an Add of a constant (a bias) stays float."""
    model = _graph([
        ("Conv", "conv_a", ["x", "w1"], "a"), ("Relu", "relu_a", ["a"], "ra"),
        ("Conv", "conv_f", ["ra", "w2"], "f"),
        ("Conv", "conv_b", ["x", "w3"], "b"), ("Relu", "relu_b", ["b"], "rb"),
        ("Conv", "conv_c", ["rb", "w4"], "c"),
        ("Add", "add", ["ra", "rb"], "s"), ("Relu", "relu_c", ["s"], "rs"), ("Conv", "conv_g", ["rs", "w5"], "g"),
        ("Conv", "conv_d", ["x", "w6"], "d"), ("Relu", "relu_d", ["d"], "rd"), ("Conv", "conv_e", ["rd", "w7"], "e"),
        ("Add", "bias", ["e", "w8"], "eb"), ("Conv", "conv_h", ["eb", "w9"], "y"),
    ])
    int8 = ["conv_a", "conv_b", "conv_c", "conv_g", "conv_d", "conv_e", "conv_h"]  # conv_f stays float
    assert int8_glue(model, int8) == ["relu_d"]
    assert int8_glue(model, [*int8, "conv_f"]) == ["relu_a", "relu_b", "add", "relu_c", "relu_d"]


def test_a_float_layer_gets_back_only_the_tensor_it_read_before_quantization():
    """Where the quantizer folded a ReLU into the quantization (the convolution now writes the
    ReLU's output name), the float layer keeps the Q -> DQ copy, which holds the ReLU; where it
    renamed a tensor that is also a graph output, the float layer reads the renamed tensor."""
    source = _graph([("Conv", "conv", ["x", "w1"], "c"), ("Relu", "relu", ["c"], "r"),
                     ("Conv", "float", ["r", "w2"], "y"), ("Conv", "float2", ["c", "w3"], "z")], outputs=("y", "c"))
    quantized = _graph([
        ("Conv", "conv", ["x", "w1"], "r"),  # the ReLU folded: the convolution writes its output name
        ("QuantizeLinear", "q", ["r", "ws"], "rq"), ("DequantizeLinear", "dq", ["rq", "ws"], "rdq"),
        ("Conv", "float", ["rdq", "w2"], "y"),
    ], outputs=("y",))
    assert [n.input[0] for n in detach_from_qdq(quantized, ["conv"], source).graph.node][3] == "rdq"
    renamed = _graph([
        ("Conv", "conv", ["x", "w1"], "c_QuantizeLinear_Input"),
        ("QuantizeLinear", "q", ["c_QuantizeLinear_Input", "ws"], "cq"), ("DequantizeLinear", "dq", ["cq", "ws"], "c"),
        ("Relu", "relu", ["c"], "r"), ("Conv", "float", ["r", "w2"], "y"), ("Conv", "float2", ["c", "w3"], "z"),
    ], outputs=("y", "c"))
    assert [n.input[0] for n in detach_from_qdq(renamed, ["conv"], source).graph.node][5] == "c_QuantizeLinear_Input"


def test_whole_model_or_per_layer_precision_is_itself_sampled(zoo_models, tmp_path):
    """per_layer = "sampled": the trial first picks the whole model's precision or "per-layer", and
    only in the second case samples a precision per layer (int4 included where it applies); the
    anchors take every layer at the strongest common precision."""
    import optuna

    from autocomp.proposals import anchors
    from autocomp.space import ConcreteSpace

    path, inputs = zoo_models["vit"]
    method = QuantizeMethod()
    config = method.parse_config({"per_layer": "sampled"}, "file.toml")
    info = BaseModelInfo(model=None, example_input=inputs[:1], onnx_path=path, target=unmeasured_target(precisions=ALL))
    first, *layers = method.parameters(config, info)
    assert (first.name, first.choices, first.neutral) == ("all_layers", ("per-layer", "fp32", "fp16", "int8"), "fp32")
    table = layer_table(onnx.load(str(path)))
    assert [p.name for p in layers] == list(table) and any("int4" in p.choices for p in layers)
    assert all(p.only_if == ("quantize.all_layers", "per-layer") for p in layers)
    space = ConcreteSpace(((method, config, (first, *layers)),))
    assert anchors(space)[0]["quantize.all_layers"] == "int8"

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"quantize.all_layers": "int8"})
    whole = space.sample(study.ask()).settings["quantize"]
    assert whole == {"all_layers": "int8"}  # no layer's precision is sampled
    study.enqueue_trial({"quantize.all_layers": "per-layer"})
    mixed = space.sample(study.ask()).settings["quantize"]
    assert mixed.keys() == {"all_layers", *table} and len({mixed[n] for n in table}) > 1

    ctx = _ctx(tmp_path, inputs)
    graph = onnx.load(str(method.apply(path, whole, config, ctx)))
    assert {_precision_of(graph, layer.node) for layer in table.values()} == {"int8"}
    ctx = _ctx(tmp_path, inputs)
    graph = onnx.load(str(method.apply(path, mixed, config, ctx)))
    assert {n: _precision_of(graph, layer.node) for n, layer in table.items()} == {n: mixed[n] for n in table}
    with pytest.raises(SpaceError, match="sampled"):
        method.parse_config({"per_layer": "yes"}, "file.toml")


def test_all_fp32_returns_the_export_unchanged(zoo_models, tmp_path):
    path, inputs = zoo_models["resnet20"]
    ctx = _ctx(tmp_path, inputs)
    assert QuantizeMethod().apply(path, _setting(path, "fp32"), QuantizeConfig(), ctx) == path
    assert EVALUATION_ARTIFACT not in ctx.notes and ctx.skipped == []


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return model.eval(), torch.randn(64, 8, generator=torch.Generator().manual_seed(2)) * 3


def test_fp16_twin_rounds_exactly_where_fp16_would(tmp_path, torch_threads):
    model, inputs = _mlp()
    path = _export(model, inputs[:1], tmp_path / "mlp.onnx")
    ctx = _ctx(tmp_path, inputs)
    out = QuantizeMethod().apply(path, {"0": "fp16", "2": "fp16"}, QuantizeConfig(), ctx)
    twin = run_batches(ctx.notes[EVALUATION_ARTIFACT], inputs.numpy())

    # The output is the fp16 Gemm's: every value representable in float16.
    assert np.array_equal(twin, twin.astype(np.float16).astype(np.float32))

    def r16(a):
        return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)

    w1, b1, w2, b2 = (p.detach().numpy() for p in model.parameters())
    hidden = r16(np.maximum(r16(r16(inputs.numpy()) @ r16(w1).T + r16(b1)), 0))
    expected = r16(hidden @ r16(w2).T + r16(b2))
    # fp32 accumulation order differs from numpy's: at most one float16 step apart
    assert np.allclose(twin, expected, rtol=2 ** -10, atol=1e-6)

    # The deployable graph holds fp16 weights; the fp16 region spans the ReLU, so Casts sit at the
    # ends only, and it still loads and runs here.
    graph = onnx.load(str(out))
    assert sum(n.op_type == "Cast" for n in graph.graph.node) == 2
    assert {i.data_type for i in graph.graph.initializer} == {TensorProto.FLOAT16}
    assert np.allclose(run_batches(out, inputs.numpy()), twin, rtol=1e-2, atol=1e-2)


# --- what the method leaves alone ----------------------------------------------------------------


def test_unsupported_layers_are_skipped_not_fatal(zoo_models, tmp_path):
    path, inputs = zoo_models["vit"]
    setting = {
        "patch_embed.proj": "int4",  # a Conv: int4 is weight-only for MatMul/Gemm
        "blocks.0.attn": "int4",  # q @ k^T: no constant weight
        "blocks.0.mlp.fc1": "fp16",
        "blocks.9.mlp.fc1": "int8",  # not in this candidate (removed block)
        "head": "int4",
    }
    ctx = _ctx(tmp_path, inputs, precisions={"fp32", "int8", "int4"})  # fp16 not run by this target
    out = QuantizeMethod().apply(path, setting, QuantizeConfig(), ctx)
    why = {what: reason for method, what, reason in ctx.skipped if method == "quantize"}
    assert why["patch_embed.proj"].startswith("int4: int4 is weight-only for MatMul/Gemm")
    assert why["blocks.0.attn"] == "int4: its weight (second input) is not a constant; left in fp32"
    assert why["blocks.0.mlp.fc1"] == "target 'device' does not run fp16; left in fp32"
    assert why["blocks.9.mlp.fc1"] == "layer not present in this candidate"
    assert set(why) == {"patch_embed.proj", "blocks.0.attn", "blocks.0.mlp.fc1", "blocks.9.mlp.fc1"}
    graph = onnx.load(str(out))
    table = layer_table(onnx.load(str(path)))
    assert _precision_of(graph, table["head"].node) == "int4"
    assert _precision_of(graph, table["patch_embed.proj"].node) == "fp32"
    run_batches(out, inputs.numpy())


def _integer_matmul(path: Path) -> Path:
    """x (float) -> Cast int32 -> MatMul with an int32 weight -> Cast float: a MatMul fp16 cannot take."""
    nodes = [
        helper.make_node("Cast", ["input"], ["x_int"], name="/to_int/Cast", to=TensorProto.INT32),
        helper.make_node("MatMul", ["x_int", "w"], ["y_int"], name="/proj/MatMul"),
        helper.make_node("Cast", ["y_int"], ["output"], name="/to_float/Cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "integer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.INT32, [4, 3], list(range(12)))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_node_fp16_cannot_convert_is_skipped(tmp_path):
    path = _integer_matmul(tmp_path / "int.onnx")
    inputs = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    ctx = _ctx(tmp_path, inputs)
    out = QuantizeMethod().apply(path, {"proj": "fp16"}, QuantizeConfig(), ctx)
    assert ctx.skipped == [("quantize", "proj", "fp16: input 'x_int' is not float32; left in fp32")]
    assert out == path and EVALUATION_ARTIFACT not in ctx.notes
    _, skipped = convert_float16(onnx.load(str(path)), ["/proj/MatMul", "/to_float/Cast"])
    assert skipped == {"/proj/MatMul": "input 'x_int' is not float32",
                       "/to_float/Cast": "Cast is not a layer this pass converts"}


def test_factorized_layer_takes_the_precision_of_the_layer_it_replaced():
    """Low-rank factorization turns `fc` into `fc.0` and `fc.1`; both inherit the sampled precision."""
    from autocomp_plugins.quantize import _expand_to_factors

    layers = {"fc.0": None, "fc.1": None, "layer1.0.conv1": None, "fc2": None}
    setting = {"fc": "int8", "layer1.0.conv1": "fp16", "gone": "int8"}
    assert _expand_to_factors(setting, layers) == {"fc.0": "int8", "fc.1": "int8", "layer1.0.conv1": "fp16",
                                                   "gone": "int8"}


@pytest.mark.parametrize("node, module", [
    ("/layer2/layer2.0/shortcut/shortcut.0/Conv", "layer2.0.shortcut.0"),
    ("/layer1/layer1.0/conv1/conv1.0/Conv", "layer1.0.conv1.0"),
    ("/features/features.0/features.0.0/Conv", "features.0.0"),
    ("/fc/Gemm", "fc"),
])
def test_layer_names_follow_module_paths(node, module):
    from autocomp_plugins._precision import layer_name

    assert layer_name(node) == module
