"""Channel pruning: MACs fall as hand-counted, models stay runnable and export faithfully, every
importance criterion and scope does what it says, and what cannot be pruned is skipped, not crashed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from autocomp.candidate import count_macs
from autocomp_plugins.prune import prunable_groups, prune_model

pytestmark = pytest.mark.usefixtures("torch_threads")


def _two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def _hand_count(c1: int, c2: int) -> int:
    """Operations counted by torch-pruning on 8x8 inputs: conv MACs + bias adds, ReLU, pooling, fc."""
    hw = 64
    conv1 = c1 * 1 * 9 * hw + c1 * hw
    conv2 = c2 * c1 * 9 * hw + c2 * hw
    return conv1 + c1 * hw + conv2 + c2 * hw + c2 * hw + (c2 * 10 + 10)


def test_macs_fall_as_hand_counted():
    model, x = _two_convs(), torch.zeros(1, 1, 8, 8)
    assert count_macs(model, x)[0] == _hand_count(8, 8)
    groups = prunable_groups(model, x)
    assert groups == {"0": 8, "2": 8}  # the classifier ("6") is never a root
    kept = prune_model(model, x, {"0": 0.5}, round_to=1)
    assert kept == {"0": (8, 4)}
    assert model[0].out_channels == 4 and model[2].in_channels == 4
    assert count_macs(model, x)[0] == _hand_count(4, 8)


def test_round_to_and_classifier_kept():
    from autocomp_plugins.digits import DigitsResNet

    model, x = DigitsResNet(width=32).eval(), torch.zeros(1, 1, 32, 32)
    groups = prunable_groups(model, x)
    kept = prune_model(model, x, {name: 0.37 for name in groups}, round_to=8)
    assert all(k % 8 == 0 and k < c for c, k in kept.values())
    assert model.fc.out_features == 10
    assert model(x).shape == (1, 10)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_pruned_model_runs_and_its_export_matches_torch(tmp_path, tiny_workload, ratio):
    from autocomp.export import check_parity, export_onnx

    model = copy.deepcopy(tiny_workload.model)
    x = tiny_workload.example_input
    before = count_macs(model, x)[0]
    prune_model(model, x, {name: ratio for name in prunable_groups(model, x)}, round_to=2)
    assert count_macs(model, x)[0] < before
    path = export_onnx(model, x, tmp_path / "pruned.onnx")
    assert check_parity(model, path, tiny_workload.val.inputs[:16]) < 1e-4
    # the base model is untouched by pruning a copy
    assert tiny_workload.model.stem[0].out_channels == 8


# --- importance, scope, progressive pruning, architectures, custom layers -----------------------

IMPORTANCES = ["l1", "l2", "taylor", "activation", "random"]


def _workload(model, inputs, targets):
    from autocomp.workload import Split, Workload

    split = Split(inputs, targets)
    return Workload(name="toy", model=model, example_input=inputs[:1], train=split, val=split, batch_size=16)


def _random_workload(model, example_input, n=32):
    """Random inputs labelled by the model itself: enough for gradients and activations."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn((n, *example_input.shape[1:]), generator=generator)
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    return _workload(model, inputs, targets)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_each_importance_prunes_and_its_export_matches_torch(tmp_path, tiny_workload, importance):
    from autocomp.export import check_parity, export_onnx

    model = copy.deepcopy(tiny_workload.model)
    x = tiny_workload.example_input
    before = count_macs(model, x)[0]
    groups = prunable_groups(model, x)
    kept = prune_model(model, x, {name: 0.5 for name in groups}, importance, round_to=2,
                       workload=tiny_workload, seed=3)
    assert kept == {name: (c, c // 2) for name, c in groups.items()}
    assert count_macs(model, x)[0] < before
    assert all(p.grad is None for p in model.parameters())  # Taylor's gradients are not left behind
    path = export_onnx(model, x, tmp_path / f"{importance}.onnx")
    assert check_parity(model, path, tiny_workload.val.inputs[:16]) < 1e-4


def _dead_channel_model():
    """conv1's channel 0 has the largest weights but reads an input channel that is always zero,
    so it contributes nothing: magnitude keeps it, gradients and activations see it is useless."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 1] = 5.0  # big, but on the dead input channel
        model[0].weight[1:, 0, 0, 0] = torch.tensor([0.5, 0.6, 0.7])
        model[2].weight.fill_(0.3)
    inputs = torch.rand(64, 2, 4, 4) + 0.1
    inputs[:, 1] = 0.0
    return model, _workload(model, inputs, torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("importance, dropped", [("l1", 1), ("l2", 1), ("taylor", 0), ("activation", 0)])
def test_data_aware_importance_drops_the_dead_channel_magnitude_keeps(importance, dropped):
    model, workload = _dead_channel_model()
    before = model[0].weight.detach().clone()
    prune_model(model, workload.example_input, {"0": 0.25}, importance, round_to=1, workload=workload)
    assert model[0].out_channels == 3
    kept = [c for c in range(4) if any(torch.equal(before[c], w) for w in model[0].weight.detach())]
    assert set(range(4)) - set(kept) == {dropped}


@pytest.mark.parametrize("round_to, tolerance", [(1, 0.01), (8, 0.06)])
def test_global_scope_prunes_the_ratio_overall_and_respects_round_to(round_to, tolerance):
    from autocomp_plugins.digits import DigitsResNet

    torch.manual_seed(0)
    model, x = DigitsResNet(width=32).eval(), torch.zeros(1, 1, 8, 8)
    kept = prune_model(model, x, 0.4, "l2", round_to=round_to, max_ratio=0.7)
    assert set(kept) == set(prunable_groups(DigitsResNet(width=32), x))
    removed = sum(c - k for c, k in kept.values()) / sum(c for c, _ in kept.values())
    assert abs(removed - 0.4) <= tolerance
    assert all(k % round_to == 0 and k >= 0.3 * c for c, k in kept.values())  # no group past max_ratio
    assert len({k / c for c, k in kept.values()}) > 1  # ratios differ between groups: ranked globally
    assert model(x).shape == (1, 10)


def test_progressive_pruning_ends_at_the_one_shot_channel_counts(tiny_workload):
    x = tiny_workload.example_input
    groups = prunable_groups(tiny_workload.model, x)
    ratios = {name: r for name, r in zip(sorted(groups), [0.25, 0.5, 0.75, 0.4, 0.6, 0.3, 0.5])}
    one_shot = prune_model(copy.deepcopy(tiny_workload.model), x, ratios, "taylor", round_to=2,
                           workload=tiny_workload)
    model = copy.deepcopy(tiny_workload.model)
    stepped = prune_model(model, x, ratios, "taylor", round_to=2, workload=tiny_workload,
                          progressive_steps=3, finetune_steps=2)
    assert stepped == one_shot
    assert not model.training and model(x).shape == (1, 10)
    # fine-tuning between steps changed the weights the final step saw
    assert not torch.equal(model.fc.weight, tiny_workload.model.fc.weight)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet20", "resnet56", "mobilenet_v2",
                                  "vit", "mobilefacenet"])
def test_every_zoo_architecture_prunes_runs_and_exports(tmp_path, name):
    from autocomp import zoo
    from autocomp.export import check_parity, export_onnx

    torch.manual_seed(0)
    model = zoo.build(name, **zoo.tiny_kwargs(name)).eval()
    x = zoo.example_input(name, tiny=True)
    expected = model(x).shape
    before = count_macs(model, x)[0]
    groups = prunable_groups(model, x)
    skipped = []
    importance = "taylor" if name in ("vit", "mobilenet_v2") else "l2"
    kept = prune_model(model, x, {g: 0.5 for g in groups}, importance, round_to=2,
                       skip=lambda what, why: skipped.append((what, why)), workload=_random_workload(model, x))
    assert skipped == [] and set(kept) == set(groups)
    assert all(k < c for c, k in kept.values())
    assert count_macs(model, x)[0] < before
    assert model(x).shape == expected
    path = export_onnx(model, x, tmp_path / f"{name}.onnx")
    check_parity(model, path, zoo.example_input(name, batch=4, tiny=True))


def test_vit_heads_lose_the_same_dimensions_in_q_k_and_v():
    from autocomp import zoo

    model = zoo.build("vit", **zoo.tiny_kwargs("vit")).eval()
    x = zoo.example_input("vit", tiny=True)
    attn = model.blocks[0].attn
    groups = prunable_groups(model, x)
    assert groups["blocks.0.attn.qkv"] == 3 * attn.num_heads * attn.head_dim
    kept = prune_model(model, x, {"blocks.0.attn.qkv": 0.25}, "l1", round_to=4)
    assert kept == {"blocks.0.attn.qkv": (96, 72)}
    assert (attn.num_heads, attn.head_dim) == (2, 12)
    assert attn.proj.in_features == 24 and model(x).shape == (1, 10)


class _Gate(nn.Module):
    """A layer torch-pruning does not know: its own weight, used through a matmul in forward."""

    def __init__(self, channels: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels, channels) * 0.1)

    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3)) @ self.w)[:, :, None, None]


def _custom_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), _Gate(8), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_a_group_through_an_unknown_custom_layer_is_skipped_not_crashed(tmp_path):
    from autocomp.export import check_parity, export_onnx

    model, x = _custom_layer_model(), torch.zeros(1, 1, 8, 8)
    skipped = []
    kept = prune_model(model, x, {"0": 0.5, "3": 0.5}, round_to=1, skip=lambda what, why: skipped.append((what, why)))
    assert kept == {"3": (8, 4)}  # the other group is still pruned
    assert [what for what, _ in skipped] == ["0"] and "2.w" in skipped[0][1]
    assert model[0].out_channels == 8 and model[2].w.shape == (8, 8)  # rolled back whole
    path = export_onnx(model, x, tmp_path / "custom.onnx")
    check_parity(model, path, torch.randn(4, 1, 8, 8))


def test_method_searches_importance_and_scope_and_records_skips(tmp_path):
    from autocomp.method import BaseModelInfo, CandidateContext, ChoiceParam, FloatParam
    from autocomp_plugins.prune import PruneMethod

    method = PruneMethod()
    config = method.parse_config({"ratio": [0.0, 0.5], "importance": ["l1", "taylor"], "scope": ["group", "global"],
                                  "round_to": 1}, "space.toml")
    model, x = _custom_layer_model(), torch.zeros(1, 1, 8, 8)
    params = {p.name: p for p in method.parameters(config, BaseModelInfo(model, x, tmp_path / "m.onnx", None))}
    assert params["importance"] == ChoiceParam("importance", ("l1", "taylor"))
    assert params["global_ratio"].only_if == ("prune.scope", "global")
    assert isinstance(params["3"], FloatParam) and params["3"].only_if == ("prune.scope", "group")
    ctx = CandidateContext(workload=_random_workload(model, x), teacher=model, target=None, work_dir=tmp_path, seed=0)
    pruned = method.apply(copy.deepcopy(model), {"importance": "taylor", "scope": "global", "global_ratio": 0.5},
                          config, ctx)
    assert [(m, what) for m, what, _ in ctx.skipped] == [("prune", "0")]
    assert ctx.notes["prune_channels"]["3"][1] < 8 and ctx.notes["prune_importance"] == "taylor"
    assert pruned(x).shape == (1, 10)


@pytest.mark.parametrize("table, key", [
    ({"importance": "l3"}, "prune.importance"),
    ({"importance": ["l1", "l1"]}, "prune.importance"),
    ({"scope": "local"}, "prune.scope"),
    ({"progressive_steps": 0}, "prune.progressive_steps"),
    ({"finetune_steps": 5}, "prune.finetune_steps"),  # needs progressive_steps >= 2
    ({"progressive_steps": 2, "finetune_lr": 0}, "prune.finetune_lr"),
    ({"importance_batches": 1.5}, "prune.importance_batches"),
])
def test_bad_prune_config_names_the_key(table, key):
    from autocomp.errors import SpaceError
    from autocomp_plugins.prune import PruneMethod

    with pytest.raises(SpaceError) as info:
        PruneMethod().parse_config(table, "space.toml")
    assert info.value.key == key and info.value.source == "space.toml"
    assert key.split(".")[1] in info.value.message
