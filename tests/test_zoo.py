"""The reference architectures: shapes, known parameter counts, ONNX parity, and torch-pruning tracing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from autocomp import zoo

NAMES = list(zoo.ARCHITECTURES)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from threads, and on a busy machine torch's spinning worker
    # threads made this module about 7x slower (18 s against 131 s on 2 loaded cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BatchNorm the statistics of ``x`` and return the model in eval mode.

    Freshly initialised BN layers hold mean 0 / variance 1, which leaves some tiny models with
    outputs near 1e-8 (where any parity check passes) and deep ones near 1e3; with real
    statistics activations have unit scale, so the comparisons below mean something.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _tiny_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = zoo.build(name, **zoo.tiny_kwargs(name))
    return _calibrate_batchnorm(model, zoo.example_input(name, batch=8, tiny=True))


def _output_size(name: str) -> int:
    kwargs = zoo.tiny_kwargs(name)
    return kwargs["embedding_size"] if name == "mobilefacenet" else kwargs["num_classes"]


def _final_layer(model: nn.Module) -> nn.Linear:
    """The classifier (or embedding) layer, whose outputs must never be pruned: the last Linear."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- shapes and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_output_shape(name):
    model = _tiny_model(name)
    with torch.no_grad():
        out = model(zoo.example_input(name, batch=2, tiny=True))
    assert out.shape == (2, _output_size(name))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_is_tiny(name):
    assert 1_000 <= _count(zoo.build(name, **zoo.tiny_kwargs(name))) <= 100_000


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("mobilenet_v2", 3_504_872),
    ],
)
def test_standard_parameter_count_matches_torchvision(name, expected):
    assert _count(zoo.build(name, num_classes=1000)) == expected


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet18", (1, 3, 224, 224)),
        ("resnet56", (1, 3, 32, 32)),
        ("mobilenet_v2", (1, 3, 224, 224)),
        ("vit", (1, 3, 32, 32)),
        ("mobilefacenet", (1, 3, 112, 112)),
    ],
)
def test_example_input_has_the_standard_shape(name, shape):
    assert zoo.example_input(name).shape == shape
    assert zoo.example_input(name, batch=4, tiny=True).shape[0] == 4


def test_example_input_is_reproducible_and_leaves_global_seed_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = zoo.example_input("vit", tiny=True)
    assert torch.equal(first, zoo.example_input("vit", tiny=True))
    assert torch.equal(torch.rand(1), expected_next)


def test_standard_mobilefacenet_gives_embeddings():
    model = zoo.build("mobilefacenet")
    assert model.feature_map_size == 7
    assert model.gdc[0].kernel_size == (7, 7)
    assert model.embedding[1].out_features == 128


# --- the registry and user errors -------------------------------------------------------------


def test_unknown_name_is_reported_with_the_known_ones():
    with pytest.raises(ValueError, match=r"'resnet19'.*resnet18.*mobilefacenet"):
        zoo.build("resnet19")
    with pytest.raises(ValueError, match="resnet19"):
        zoo.tiny_kwargs("resnet19")
    with pytest.raises(ValueError, match="resnet19"):
        zoo.example_input("resnet19")


def test_tiny_kwargs_returns_a_fresh_dict():
    zoo.tiny_kwargs("vit")["dim"] = 999
    assert zoo.tiny_kwargs("vit")["dim"] != 999


@pytest.mark.parametrize(
    ("builder", "kwargs", "message"),
    [
        (zoo.cifar_resnet, {"depth": 21}, r"6n \+ 2.*depth=21"),
        (zoo.vit, {"dim": 30, "heads": 4}, r"multiple of heads.*dim=30, heads=4"),
        (zoo.vit, {"image_size": 30, "patch_size": 4}, r"multiple of patch_size.*image_size=30"),
        (zoo.mobilenet_v2, {"width_mult": 0.0}, r"width_mult must be > 0.*width_mult=0.0"),
        (zoo.mobilefacenet, {"input_size": 0}, r"input_size must be >= 1.*input_size=0"),
    ],
)
def test_invalid_settings_raise_value_error_stating_the_rule(builder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        builder(**kwargs)


def test_cifar_resnet_depth_sets_blocks_per_stage():
    model = zoo.build("resnet56", width=4)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [9, 9, 9]


# --- residual blocks that can be removed ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_is_shape_preserving_matches_the_shapes_seen(name):
    model = _tiny_model(name)
    shapes = {}

    def record(module, inputs, output):
        shapes[module] = (inputs[0].shape, output.shape)

    blocks = [m for m in model.modules() if hasattr(m, "is_shape_preserving")]
    handles = [b.register_forward_hook(record) for b in blocks]
    with torch.no_grad():
        model(zoo.example_input(name, batch=2, tiny=True))
    for handle in handles:
        handle.remove()

    assert blocks, "every architecture in the zoo has residual blocks"
    assert any(b.is_shape_preserving() for b in blocks)
    for block in blocks:
        in_shape, out_shape = shapes[block]
        assert block.is_shape_preserving() == (in_shape == out_shape), type(block).__name__


@pytest.mark.parametrize("name", NAMES)
def test_removing_a_shape_preserving_block_leaves_a_runnable_model(name):
    model = _tiny_model(name)
    if name == "vit":
        del model.blocks[0]
    else:
        parent, child = next(
            (parent, child_name)
            for parent in model.modules()
            for child_name, child in parent.named_children()
            if hasattr(child, "is_shape_preserving") and child.is_shape_preserving()
        )
        setattr(parent, child, nn.Identity())
    with torch.no_grad():
        out = model(zoo.example_input(name, batch=2, tiny=True))
    assert out.shape == (2, _output_size(name))


# --- ONNX export --------------------------------------------------------------------------------


def _assert_onnx_matches_torch(model: nn.Module, name: str, path) -> None:
    """Export ``model`` (legacy exporter, opset 17, dynamic batch); ONNX Runtime must agree at batch 1 and 3."""
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            zoo.example_input(name, tiny=True),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = zoo.example_input(name, batch=batch, tiny=True)
        with torch.no_grad():
            expected = model(x).numpy()
        (actual,) = session.run(["output"], {"input": x.numpy()})
        assert np.abs(expected).max() > 1e-2, "outputs this small would make the parity check vacuous"
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_matches_torch(name, tmp_path):
    _assert_onnx_matches_torch(_tiny_model(name), name, tmp_path / f"{name}.onnx")


# --- torch-pruning ------------------------------------------------------------------------------


@pytest.fixture
def tp():
    torch_pruning = pytest.importorskip("torch_pruning")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notices about unwrapped parameters (ViT's cls_token, pos_embed)
        yield torch_pruning


@pytest.mark.parametrize("name", NAMES)
def test_dependency_graph_prunes_half_of_one_group(name, tp):
    model = _tiny_model(name)
    x = zoo.example_input(name, tiny=True)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = graph.get_all_groups(
        ignored_layers=[_final_layer(model)], root_module_types=[nn.Conv2d, nn.Linear]
    )
    # The group with the most coupled layers: channels shared by every residual connection of a
    # stage (the ViT's embedding dimension), the hardest one to get right.
    group = max(groups, key=len)
    importance = tp.importance.GroupMagnitudeImportance(p=2)(group)
    channels = len(importance)
    least_important = importance.argsort()[: channels // 2].tolist()
    parameters_before = _count(model)

    group.prune(idxs=least_important)

    assert _count(model) < parameters_before
    with torch.no_grad():
        out = model(zoo.example_input(name, batch=3, tiny=True))
    assert out.shape == (3, _output_size(name))


def _prune_half_with_meta_pruner(tp, name: str, model: nn.Module, *, prune_num_heads: bool = False) -> None:
    """Remove half of every layer's channels (or, for the ViT, half of each head's dims or heads)."""
    heads = {}
    if name == "vit":
        # The fused qkv output is three tensors of num_heads x head_dim; telling torch-pruning the
        # head count makes it remove the same head dimensions (or heads) from q, k and v.
        heads = {block.attn.qkv: block.attn.num_heads for block in model.blocks}
    pruner = tp.pruner.MetaPruner(
        model,
        zoo.example_input(name, tiny=True),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[_final_layer(model)],
        num_heads=heads,
        prune_num_heads=prune_num_heads,
        prune_head_dims=not prune_num_heads,
        head_pruning_ratio=0.5,
        # torch-pruning 1.6 merges num_heads into a mutable default dict shared by every
        # MetaPruner; fresh dicts keep one test's heads out of the next.
        in_channel_groups={},
        out_channel_groups={},
    )
    pruner.step()
    if name == "vit":
        for block in model.blocks:  # forward reads these; torch-pruning only changed the weights
            block.attn.num_heads = pruner.num_heads[block.attn.qkv]
            block.attn.head_dim = block.attn.qkv.out_features // (3 * block.attn.num_heads)


@pytest.mark.parametrize("name", NAMES)
def test_meta_pruner_halves_every_layer_and_the_result_exports(name, tp, tmp_path):
    model = _tiny_model(name)
    parameters_before = _count(model)

    _prune_half_with_meta_pruner(tp, name, model)

    assert _count(model) < 0.5 * parameters_before
    with torch.no_grad():
        out = model(zoo.example_input(name, batch=3, tiny=True))
    assert out.shape == (3, _output_size(name))
    if name == "vit":
        dim, heads = zoo.tiny_kwargs("vit")["dim"], zoo.tiny_kwargs("vit")["heads"]
        expected = [(heads, dim // heads // 2)] * len(model.blocks)  # same heads, half as wide
        assert [(b.attn.num_heads, b.attn.head_dim) for b in model.blocks] == expected
    _assert_onnx_matches_torch(model, name, tmp_path / f"{name}-pruned.onnx")


def test_meta_pruner_removes_whole_vit_heads(tp, tmp_path):
    model = _tiny_model("vit")
    dim, heads = zoo.tiny_kwargs("vit")["dim"], zoo.tiny_kwargs("vit")["heads"]

    _prune_half_with_meta_pruner(tp, "vit", model, prune_num_heads=True)

    expected = [(heads // 2, dim // heads)] * len(model.blocks)  # half the heads, each as wide
    assert [(b.attn.num_heads, b.attn.head_dim) for b in model.blocks] == expected
    _assert_onnx_matches_torch(model, "vit", tmp_path / "vit-fewer-heads.onnx")
