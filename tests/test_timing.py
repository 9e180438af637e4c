"""The cpu timing harness: run counts and the figures it reports."""

from __future__ import annotations

import pytest

from autocomp.ort import TimingPolicy, measure_latency


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    import torch

    from autocomp.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return export_onnx(model, torch.randn(1, 16), tmp_path_factory.mktemp("timing") / "m.onnx")


def test_runs_and_order_statistics(small_onnx):
    policy = TimingPolicy(warmup_runs=1, warmup_s=0.0, min_runs=9, min_s=0.0)
    stats = measure_latency(small_onnx, {"input": (1, 16)}, policy)
    assert stats.runs == 9 and stats.measured
    assert 0 < stats.facts["min_ms"] <= stats.p50_ms <= stats.p90_ms


def test_max_runs_caps_the_total(small_onnx):
    policy = TimingPolicy(warmup_runs=1, warmup_s=0.0, min_runs=7, min_s=10.0, max_runs=7)
    assert measure_latency(small_onnx, {"input": (1, 16)}, policy).runs == 7


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="min_runs >= 1"):
        TimingPolicy(min_runs=0)
