"""Channel pruning: MACs fall as hand-counted, models stay runnable and export faithfully."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from autocomp_plugins.prune import count_macs, prunable_groups, prune_model


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
