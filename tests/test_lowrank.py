"""Low-rank factorization: exact at full rank, hand-counted sizes at rank r, skipped layers named with
a reason, ranks follow pruned shapes, and the factorized model exports faithfully."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocomp.candidate import count_macs, recalibrate_batchnorm
from autocomp.errors import SpaceError
from autocomp.method import BaseModelInfo, CandidateContext, FloatParam
from autocomp.workload import Split, Workload
from autocomp_plugins.lowrank import (
    LowRankConfig,
    LowRankMethod,
    factorize_conv,
    factorize_linear,
    lowrank_layers,
    rank_for,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _context(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> CandidateContext:
    inputs = torch.randn((16, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    split = Split(inputs, torch.zeros(16, dtype=torch.long))
    workload = Workload(name="tiny", model=model, example_input=x, train=split, val=split)
    return CandidateContext(workload=workload, teacher=model, target=None, work_dir=tmp_path, seed=0)


# --- the factorizations ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_at_full_rank_reproduces_the_layer(bias):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10, bias=bias)
    factors = factorize_linear(layer, rank=10)
    x = torch.randn(5, 12)
    torch.testing.assert_close(factors(x), layer(x), atol=1e-5, rtol=1e-5)
    assert factors[0].bias is None and (factors[1].bias is not None) == bias


def test_linear_at_rank_r_has_the_hand_counted_size_and_is_the_best_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    factors = factorize_linear(layer, rank=3)
    assert [(f.in_features, f.out_features) for f in factors] == [(12, 3), (3, 10)]
    assert _count(factors) == 3 * (12 + 10) + 10  # two factors, the original bias
    # Eckart-Young: the error of the best rank-3 approximation is the norm of the dropped singular values
    singular = torch.linalg.svdvals(layer.weight.detach())
    product = factors[1].weight @ factors[0].weight
    assert torch.isclose(torch.linalg.norm(product - layer.weight), singular[3:].norm(), rtol=1e-4)


def test_conv_at_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    factors = factorize_conv(conv, rank=6)  # min(out, in*k*k) = min(6, 36)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(factors(x), conv(x), atol=1e-5, rtol=1e-5)


def test_conv_at_rank_r_gives_the_same_shape_and_the_hand_counted_macs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(1, 4, 8, 8)
    factors = factorize_conv(conv, rank=2)
    assert (factors[0].kernel_size, factors[0].stride, factors[0].out_channels) == ((3, 3), (2, 2), 2)
    assert (factors[1].kernel_size, factors[1].in_channels, factors[1].out_channels) == ((1, 1), 2, 6)
    assert factors(x).shape == conv(x).shape == (1, 6, 4, 4)
    positions = 4 * 4
    bias = 6 * positions
    assert count_macs(conv, x) == (6 * 4 * 9 * positions + bias, 6 * 4 * 9 + 6)
    # 3x3 conv 4 -> 2 (no bias), then 1x1 conv 2 -> 6 with the original bias
    assert count_macs(factors, x) == (2 * 4 * 9 * positions + 6 * 2 * positions + bias, 2 * 4 * 9 + 6 * 2 + 6)


def test_grouped_convs_are_refused():
    with pytest.raises(ValueError, match="groups=1"):
        factorize_conv(nn.Conv2d(4, 4, 3, groups=4), rank=2)


@pytest.mark.parametrize(
    "ratio, full, round_to, expected",
    [(1.0, 10, 8, 10), (0.3, 64, 8, 16), (0.01, 64, 8, 8), (0.5, 6, 8, 3), (0.05, 6, 8, 1), (0.5, 10, 1, 5)],
)
def test_rank_for(ratio, full, round_to, expected):
    assert rank_for(ratio, full, round_to) == expected


# --- which layers, and why the others are left alone -------------------------------------------


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)  # factorizable
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.square = nn.Linear(16, 16)  # rank 8 of 16 costs as much as the layer
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)  # out_proj's weight is read directly
        self.raw = nn.Linear(16, 16)  # its weight is used by F.linear, never called
        self.shared = nn.Linear(16, 16)
        self.alias = self.shared  # the same layer at two paths
        self.head = nn.Linear(16, 4)  # 64 weights, fewer than min_size

    def forward(self, x):
        x = torch.relu(self.dw(self.conv(x))).mean((2, 3))[:, None]
        x = self.attn(x, x, x, need_weights=False)[0][:, 0]
        x = self.alias(self.shared(F.linear(self.square(x), self.raw.weight)))
        return self.head(x)


def test_skipped_layers_are_listed_with_a_reason(tmp_path):
    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(1, 3, 8, 8)
    eligible, skipped = lowrank_layers(model, x, "all", min_size=100, lowest_ratio=0.5, round_to=1)
    assert eligible == {"conv": 16}
    assert skipped == {
        "dw": "depthwise conv (groups=16) is not factorized",
        "square": "even at rank_ratio 0.5, rank 8 would not reduce cost: r*(in+out) = 256 >= in*out = 256",
        "attn.out_proj": "NonDynamicallyQuantizableLinear is not factorized (only nn.Linear and nn.Conv2d are)",
        "raw": "never called as a module in forward (its weight is used directly)",
        "shared": "shared by several paths (shared, alias)",
        "alias": "shared by several paths (shared, alias)",
        "head": "64 weights, fewer than min_size=100",
    }
    assert lowrank_layers(model, x, "linear", 100)[0] == {"square": 16}  # no ratio given: any rank could do
    assert set(lowrank_layers(model, x, "conv", 0)[1]) == {"dw"}

    config = LowRankConfig(rank_ratio=(0.5, 1.0), min_size=100, round_to=1)
    ctx = _context(model, x, tmp_path)
    params = LowRankMethod().parameters(config, BaseModelInfo(model, x, Path("unused.onnx"), None))
    assert params == [FloatParam("conv", 0.5, 1.0, module="conv", neutral=1.0)]
    candidate = LowRankMethod().apply(copy.deepcopy(model), {"conv": 0.5}, config, ctx)
    assert isinstance(candidate.conv, nn.Sequential) and candidate.conv[0].out_channels == 8
    assert ctx.notes["lowrank_ranks"] == {"conv": [16, 8]}
    # layers the space never offered are not reported per trial (`autocomp space show` lists the offer)
    assert [skip for skip in ctx.skipped if skip[0] == "lowrank"] == []
    assert candidate(x).shape == (1, 4)


def test_ranks_follow_the_pruned_shape_and_gone_layers_are_skipped(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval(), torch.randn(1, 64)
    config = LowRankConfig(rank_ratio=(0.25, 1.0), min_size=0, round_to=1)
    assert [p.name for p in LowRankMethod().parameters(config, BaseModelInfo(model, x, Path("u"), None))] == ["0", "2"]
    candidate = copy.deepcopy(model)
    candidate[0] = nn.Linear(64, 32)  # as pruning would leave it
    candidate[2] = nn.Linear(32, 10)
    ctx = _context(model, x, tmp_path)
    candidate = LowRankMethod().apply(candidate, {"0": 0.5, "2": 1.0, "5": 0.5}, config, ctx)
    assert ctx.notes["lowrank_ranks"] == {"0": [32, 16]}  # half of the pruned layer's rank
    assert [(f.in_features, f.out_features) for f in candidate[0]] == [(64, 16), (16, 32)]
    assert isinstance(candidate[2], nn.Linear)  # ratio 1.0 leaves the layer alone
    assert ctx.skipped == [("lowrank", "5", "layer not present in this candidate (removed earlier)")]


def test_a_rank_that_would_not_reduce_cost_is_skipped(tmp_path):
    model, x = nn.Sequential(nn.Linear(16, 12)).eval(), torch.randn(1, 16)
    config = LowRankConfig(rank_ratio=(0.25, 1.0), min_size=0, round_to=1)
    ctx = _context(model, x, tmp_path)
    candidate = LowRankMethod().apply(copy.deepcopy(model), {"0": 0.9}, config, ctx)
    assert isinstance(candidate[0], nn.Linear)
    # 0.9 of rank 12 is 11: 11 * (16 + 12) = 308 >= 16 * 12 = 192
    assert ctx.skipped == [("lowrank", "0", "rank 11 would not reduce cost: r*(in+out) = 308 >= in*out = 192")]


def test_factorized_model_exports_faithfully_and_costs_less(tmp_path):
    from autocomp.export import check_parity, export_onnx
    from autocomp_plugins.digits import DigitsResNet

    torch.manual_seed(0)
    model, x = DigitsResNet(width=8), torch.zeros(1, 1, 32, 32)
    ctx = _context(model, x, tmp_path)
    recalibrate_batchnorm(model, ctx.workload.train.inputs, batches=1)
    model.eval()
    config = LowRankConfig(rank_ratio=(0.5, 1.0), min_size=0, round_to=1)
    params = LowRankMethod().parameters(config, BaseModelInfo(model, x, Path("u"), None))
    assert len(params) == 12  # every conv and the classifier
    candidate = LowRankMethod().apply(copy.deepcopy(model), {p.name: 0.5 for p in params}, config, ctx)
    assert ctx.skipped == [] and len(ctx.notes["lowrank_ranks"]) == 12
    assert candidate.fc[1].out_features == 10  # the classifier keeps its outputs
    macs, count = count_macs(model, x)
    new_macs, new_count = count_macs(candidate, x)
    assert new_macs < macs and new_count < count
    path = export_onnx(candidate, x, tmp_path / "lowrank.onnx")
    check_parity(candidate, path, ctx.workload.val.inputs[:8], atol=1e-4, rtol=1e-3)


# --- configuration ------------------------------------------------------------------------------


def test_defaults_and_no_parameters_at_full_rank():
    assert LowRankConfig() == LowRankConfig(rank_ratio=(0.25, 1.0), layers="all", min_size=1024, round_to=8)
    model, x = nn.Sequential(nn.Linear(64, 64)).eval(), torch.randn(1, 64)
    assert LowRankMethod().parameters(LowRankConfig(rank_ratio=1.0), BaseModelInfo(model, x, Path("u"), None)) == []


@pytest.mark.parametrize(
    "table, message",
    [
        ({"rank_ratio": [0.0, 0.5]}, r"rank_ratio must lie in \(0, 1\]"),
        ({"rank_ratio": [0.2, 1.5]}, r"\[lowrank.rank_ratio\] values must lie in \[0.0, 1.0\]"),
        ({"layers": "convs"}, r"layers must be one of linear, conv, all, got 'convs'"),
        ({"min_size": -1}, r"min_size must be a whole number >= 0"),
        ({"round_to": 0}, r"round_to must be a whole number >= 1, got 0"),
        ({"rank": 0.5}, r"unknown key\(s\) rank; allowed: layers, min_size, rank_ratio, round_to"),
    ],
)
def test_bad_config_names_file_key_and_rule(table, message):
    with pytest.raises(SpaceError, match=message) as info:
        LowRankMethod().parse_config(table, "space.toml")
    assert "space.toml" in str(info.value)


def test_no_layer_to_factorize_changes_nothing():
    """A setting with no layer (none large enough) factorizes nothing, like every layer at full
    rank; one layer below full rank changes the model."""
    from autocomp_plugins.lowrank import LowRankConfig, LowRankMethod

    method, config = LowRankMethod(), LowRankConfig()
    assert method.changes_nothing({}, config) and method.changes_nothing({"fc": 1.0}, config)
    assert not method.changes_nothing({"fc": 1.0, "conv": 0.5}, config)
