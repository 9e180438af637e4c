"""Block removal: which blocks are found, the model stays runnable and exports faithfully, MACs and
parameters fall by exactly the removed blocks' counts, the cap holds, and pruning parameters of a
removed block are never sampled."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from autocomp import zoo
from autocomp.candidate import count_macs, recalibrate_batchnorm
from autocomp.errors import SpaceError
from autocomp.method import BaseModelInfo, CandidateContext
from autocomp.workload import Split, Workload
from autocomp_plugins import remove_blocks as rb
from autocomp_plugins.digits import DigitsResNet
from autocomp_plugins.remove_blocks import RemoveBlocksConfig, RemoveBlocksMethod, removable_blocks


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's notices about unwrapped parameters
        yield
    torch.set_num_threads(threads)


def _inputs(shape, batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(seed))


def _model_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A tiny zoo model (or the digits model) with batch-norm statistics of real-scale inputs."""
    torch.manual_seed(0)
    if name == "digits":
        model, x = DigitsResNet(width=8), torch.zeros(1, 1, 32, 32)
    else:
        model, x = zoo.build(name, **zoo.tiny_kwargs(name)), zoo.example_input(name, tiny=True)
    recalibrate_batchnorm(model, _inputs(x.shape, 32, seed=1), batches=1)
    return model.eval(), x


def _workload(model: nn.Module, x: torch.Tensor) -> Workload:
    labels = torch.zeros(32, dtype=torch.long)
    return Workload(name="tiny", model=model, example_input=x,
                    train=Split(_inputs(x.shape, 32, seed=1), labels), val=Split(_inputs(x.shape, 32, seed=2), labels))


def _context(workload: Workload, tmp_path: Path) -> CandidateContext:
    return CandidateContext(workload=workload, teacher=workload.model, target=None, work_dir=tmp_path, seed=0)


def _base_info(model, x) -> BaseModelInfo:
    return BaseModelInfo(model, x, Path("unused.onnx"), None)  # neither method reads the export or target


# --- which blocks are found ---------------------------------------------------------------------

EXPECTED_BLOCKS = {
    # ResNet-18: the first block of stages 2-4 changes width and stride; layer1.0 keeps both
    "resnet18": ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"],
    "resnet20": ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"],
    # inverted residuals with a shortcut: stride 1 and as many channels out as in
    "mobilenet_v2": [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)],
    "vit": ["blocks.0", "blocks.1"],
    "mobilefacenet": [f"features.{i}" for i in (3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 15, 16)],
    "digits": ["layer1.0", "layer1.1"],
}


@pytest.mark.parametrize("name", list(EXPECTED_BLOCKS))
def test_removable_blocks_are_the_shape_preserving_residual_blocks(name):
    model, x = _model_and_input(name)
    found = removable_blocks(model, x)
    assert found == EXPECTED_BLOCKS[name]
    declared = [n for n, m in model.named_modules() if hasattr(m, "is_shape_preserving") and m.is_shape_preserving()]
    assert found == declared


class _Residual(nn.Module):
    """A residual block from outside the zoo: no is_shape_preserving, ``x + f(x)``."""

    def __init__(self, channels: int, identity_shortcut: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.shortcut = nn.Identity() if identity_shortcut else None

    def forward(self, x):
        skip = self.shortcut(x) if self.shortcut is not None else x
        return torch.relu(self.conv(x) + skip)


class _Plain(nn.Module):
    """Shape-preserving but without a skip connection: it carries the only path, never removed."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class _Branchy(nn.Module):
    """A residual whose forward depends on the data: fx cannot trace it, so it is not proposed."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x) if x.sum() > -1e9 else x


class _Strided(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x) + x[:, :, ::2, ::2]


def test_residual_blocks_outside_the_zoo_are_found_generically():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 0: stem, changes the channel count
        _Residual(4),  # 1: found
        _Plain(4),  # 2: no skip connection
        _Residual(4, identity_shortcut=True),  # 3: found, the shortcut is an nn.Identity
        _Branchy(4),  # 4: not traceable
        _Strided(4),  # 5: changes shape
        nn.ReLU(),  # 6: torch's own layer
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()
    assert removable_blocks(model, torch.randn(1, 1, 8, 8)) == ["1", "3"]


def test_a_block_called_twice_is_not_removable():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_Residual(2), _Residual(2)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](self.blocks[0](x)))

    assert removable_blocks(Twice().eval(), torch.randn(1, 2, 4, 4)) == ["blocks.1"]


# --- removing blocks ----------------------------------------------------------------------------


def test_removing_one_digits_block_saves_its_hand_counted_macs_and_parameters(tmp_path):
    from autocomp.export import check_parity, export_onnx

    model, x = _model_and_input("digits")
    macs, params = count_macs(model, x)
    ctx = _context(_workload(model, x), tmp_path)
    candidate = RemoveBlocksMethod().apply(copy.deepcopy(model), {"layer1.0": False, "layer1.1": True},
                                           RemoveBlocksConfig(), ctx)

    # layer1.1 at width 8 on 32x32: two 3x3 convs 8 -> 8 (no bias), two BNs and two ReLUs, as
    # torch-pruning counts them (BN: 2 per element, ReLU: 1 per element; the add is not counted)
    positions = 32 * 32
    conv = 8 * 8 * 9 * positions
    block_macs = 2 * conv + 2 * (2 * 8 * positions) + 2 * (8 * positions)
    block_params = 2 * (8 * 8 * 9) + 2 * (2 * 8)
    assert (block_macs, block_params) == (1_228_800, 1_184)
    assert count_macs(candidate, x) == (macs - block_macs, params - block_params)
    assert isinstance(candidate.layer1[1], nn.Identity) and not isinstance(candidate.layer1[0], nn.Identity)
    assert ctx.notes["removed_blocks"] == ["layer1.1"] and ctx.skipped == []
    assert not isinstance(model.layer1[1], nn.Identity)  # the copy changed, not the base model

    path = export_onnx(candidate, x, tmp_path / "removed.onnx")
    check_parity(candidate, path, ctx.workload.val.inputs[:8], atol=1e-4, rtol=1e-3)


def _macs_of_blocks(model: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[int, int]:
    """MACs and parameters of each block alone, on the input it sees inside ``model``, summed."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.setdefault(p, a[0]))
               for p in paths]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    counts = [count_macs(model.get_submodule(p), seen[p]) for p in paths]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "mobilenet_v2", "vit", "mobilefacenet"])
def test_removing_every_block_keeps_a_runnable_model_that_exports_faithfully(name, tmp_path):
    from autocomp.export import check_parity, export_onnx

    model, x = _model_and_input(name)
    blocks = removable_blocks(model, x)
    macs, params = count_macs(model, x)
    block_macs, block_params = _macs_of_blocks(model, x, blocks)
    ctx = _context(_workload(model, x), tmp_path)

    candidate = RemoveBlocksMethod().apply(copy.deepcopy(model), dict.fromkeys(blocks, True), RemoveBlocksConfig(), ctx)

    assert ctx.notes["removed_blocks"] == blocks and ctx.skipped == []
    assert count_macs(candidate, x) == (macs - block_macs, params - block_params)
    recalibrate_batchnorm(candidate, ctx.workload.train.inputs, batches=1)
    inputs = ctx.workload.val.inputs[:8]
    with torch.no_grad():
        out = candidate(inputs)
    assert out.shape == model(inputs).shape and out.abs().max() > 1e-2  # a vacuous parity check is no check
    path = export_onnx(candidate, x, tmp_path / f"{name}.onnx")
    check_parity(candidate, path, inputs, atol=1e-4, rtol=1e-3)


def test_vit_blocks_are_replaced_in_place_so_later_paths_stay_valid(tmp_path):
    model, x = _model_and_input("vit")
    candidate = RemoveBlocksMethod().apply(copy.deepcopy(model), {"blocks.0": True, "blocks.1": False},
                                           RemoveBlocksConfig(), _context(_workload(model, x), tmp_path))
    assert len(candidate.blocks) == 2 and isinstance(candidate.blocks[0], nn.Identity)
    # blocks.1 is still blocks.1: a pruning ratio or rank keyed by its path still finds it
    assert candidate.get_submodule("blocks.1.attn.qkv") is not None


def test_a_block_that_is_gone_is_skipped_with_a_reason(tmp_path):
    model, x = _model_and_input("digits")
    ctx = _context(_workload(model, x), tmp_path)
    candidate = copy.deepcopy(model)
    del candidate.layer1[1]  # as if something before this method had taken it
    RemoveBlocksMethod().apply(candidate, {"layer1.1": True}, RemoveBlocksConfig(), ctx)
    assert ctx.skipped == [("remove_blocks", "layer1.1", "block not present in this candidate")]
    assert ctx.notes["removed_blocks"] == []


# --- the cap ------------------------------------------------------------------------------------


def test_the_cap_removes_the_least_sensitive_blocks_and_measures_once(tmp_path, monkeypatch):
    model, x = _model_and_input("resnet20")
    blocks = removable_blocks(model, x)
    workload = _workload(model, x)
    sensitivity = rb.block_sensitivity(copy.deepcopy(model), blocks, workload.train.inputs[: rb.SENSITIVITY_EXAMPLES])
    expected = sorted(blocks, key=lambda b: sensitivity[b])[:2]

    measured: list[list[str]] = []
    real = rb.block_sensitivity
    monkeypatch.setattr(rb, "block_sensitivity", lambda m, b, i: measured.append(list(b)) or real(m, b, i))
    config = RemoveBlocksConfig(max_removed=2)
    for _ in range(2):
        ctx = _context(workload, tmp_path)
        candidate = RemoveBlocksMethod().apply(copy.deepcopy(model), dict.fromkeys(blocks, True), config, ctx)
        assert ctx.notes["removed_blocks"] == [b for b in blocks if b in expected]
        assert set(ctx.notes["blocks_kept_by_cap"]) == set(blocks) - set(expected)
        assert sum(isinstance(m, nn.Identity) for m in candidate.modules()) == 2
    assert measured == [blocks]  # once per base model: the second candidate used the cache


def test_under_the_cap_nothing_is_measured(tmp_path, monkeypatch):
    model, x = _model_and_input("digits")
    monkeypatch.setattr(rb, "block_sensitivity", lambda *a: pytest.fail("sensitivity measured needlessly"))
    ctx = _context(_workload(model, x), tmp_path)
    RemoveBlocksMethod().apply(copy.deepcopy(model), {"layer1.0": True, "layer1.1": False},
                               RemoveBlocksConfig(max_removed=1), ctx)
    assert ctx.notes["removed_blocks"] == ["layer1.0"]


# --- parameters and configuration ---------------------------------------------------------------


def test_one_flag_per_block_least_compressed_first():
    model, x = _model_and_input("resnet20")
    params = RemoveBlocksMethod().parameters(RemoveBlocksConfig(), _base_info(model, x))
    assert [p.name for p in params] == EXPECTED_BLOCKS["resnet20"]
    assert all(p.choices == (False, True) and p.removes == p.name == p.module for p in params)
    assert RemoveBlocksMethod().parameters(RemoveBlocksConfig(max_removed=0), _base_info(model, x)) == []


def test_blocks_restricts_the_candidates_and_names_the_removable_ones():
    model, x = _model_and_input("resnet20")
    method = RemoveBlocksMethod()
    params = method.parameters(method.parse_config({"blocks": ["layer1", "layer3.2"]}, "s.toml"), _base_info(model, x))
    assert [p.name for p in params] == ["layer1.0", "layer1.1", "layer1.2", "layer3.2"]
    with pytest.raises(SpaceError, match=r"\[remove_blocks.blocks\] blocks: 'layer2.0' is not a removable block.*layer1.0"):
        method.parameters(RemoveBlocksConfig(blocks=("layer2.0",)), _base_info(model, x))


@pytest.mark.parametrize(
    "table, message",
    [
        ({"max_removed": -1}, r"max_removed must be a whole number >= 0, got -1"),
        ({"max_removed": 1.5}, r"max_removed must be a whole number >= 0, got 1.5"),
        ({"blocks": "layer1.1"}, r"blocks must be a list of module paths"),
        ({"max_remove": 2}, r"unknown key\(s\) max_remove; allowed: blocks, max_removed"),
    ],
)
def test_bad_config_names_file_key_and_rule(table, message):
    with pytest.raises(SpaceError, match=message) as info:
        RemoveBlocksMethod().parse_config(table, "space.toml")
    assert "space.toml" in str(info.value) and "[remove_blocks]" in str(info.value)


def test_pruning_ratios_of_a_removed_block_are_not_sampled(tmp_path):
    import optuna

    from autocomp.candidate import build_model
    from autocomp.space import parse_space
    from autocomp_plugins.prune import PruneMethod

    model, x = _model_and_input("digits")
    methods = {"prune": PruneMethod(), "remove_blocks": RemoveBlocksMethod()}
    space = parse_space({"prune": {"ratio": [0.0, 0.5], "round_to": 1}, "remove_blocks": {}}, methods, source="t.toml")
    assert space.names() == ["remove_blocks", "prune"]  # removal runs first
    concrete = space.concrete(_base_info(model, x))
    prune_params = {p.name for m, _, ps in concrete.entries if m.name == "prune" for p in ps}
    assert "layer1.1.conv1" in prune_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"remove_blocks.layer1.1": True, "remove_blocks.layer1.0": False})
    trial = study.ask()
    spec = concrete.sample(trial)
    assert spec.settings["remove_blocks"] == {"layer1.0": False, "layer1.1": True}
    assert set(spec.settings["prune"]) == prune_params - {"layer1.1.conv1"}
    assert not any(k.startswith("prune.layer1.1.") for k in trial.params)

    ctx = _context(_workload(model, x), tmp_path)
    candidate = build_model(model, spec, concrete, ctx)
    assert isinstance(candidate.layer1[1], nn.Identity) and ctx.notes["removed_blocks"] == ["layer1.1"]
    assert not [s for s in ctx.skipped if "layer1.1" in s[1]]
    assert candidate(x).shape == (1, 10)
