"""The cpu timing harness: run counts and the figures it reports."""

from __future__ import annotations

import pytest

from autocomp.ort import TimingPolicy, measure_latency
from autocomp.target import LatencyStats


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
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms
    assert stats.value("min") == stats.min_ms and stats.value("p90") == stats.p90_ms
    # the fastest run survives the trip through the latency cache and the agent's JSON
    assert LatencyStats.from_dict(stats.to_dict()) == stats


def test_statistics_of_records_without_a_fastest_run():
    # a prediction with one figure, and a record written before min_ms was a field (it sat in the facts)
    predicted = LatencyStats(2.0, 2.0, 2.0, 0, False, "jetson")
    assert predicted.min_ms is None and predicted.value("min") == 2.0
    # a measurement without its fastest run is refused, not silently read as its p50
    with pytest.raises(ValueError, match="no fastest run .* --latency-statistic p50"):
        LatencyStats(2.0, 2.5, 2.1, 50, True, "remote").value("min")
    old = {"p50_ms": 3.0, "p90_ms": 4.0, "mean_ms": 3.2, "runs": 50, "measured": True, "target": "cpu",
           "facts": {"min_ms": 2.5}}
    assert LatencyStats.from_dict(old).value("min") == 2.5
    with pytest.raises(ValueError, match="unknown latency statistic 'p99'"):
        predicted.value("p99")
    with pytest.raises(ValueError, match="min_ms must be a finite"):
        LatencyStats(1.0, 1.0, 1.0, 1, True, "cpu", min_ms=float("nan"))


def test_max_runs_caps_the_total(small_onnx):
    policy = TimingPolicy(warmup_runs=1, warmup_s=0.0, min_runs=7, min_s=10.0, max_runs=7)
    assert measure_latency(small_onnx, {"input": (1, 16)}, policy).runs == 7


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="min_runs >= 1"):
        TimingPolicy(min_runs=0)


def test_interleaved_measures_every_item_once_per_round():
    import random

    from autocomp.latency import interleaved

    seen = []
    rows = interleaved("abc", lambda item: (seen.append(item), f"{item}{len(seen)}")[1], rounds=2)
    assert seen == list("abcabc") and rows == [["a1", "a4"], ["b2", "b5"], ["c3", "c6"]]
    seen.clear()
    shuffled = interleaved("abcd", lambda item: (seen.append(item), item)[1], rounds=3, rng=random.Random(0))
    assert shuffled == [[c] * 3 for c in "abcd"] and sorted(seen) == sorted("abcd" * 3)
    assert seen[:4] != list("abcd") or seen[4:8] != list("abcd")  # a new order each round


def test_a_second_window_keeps_the_faster_reading_in_the_cache_too(small_onnx, tmp_path):
    from dataclasses import replace

    from autocomp.latency import LatencyCache, graph_hash, target_identity
    from autocomp_plugins.cpu_target import CpuTarget

    target = CpuTarget(TimingPolicy(warmup_runs=1, warmup_s=0.0, min_runs=20, min_s=0.0))
    shapes = {"input": (1, 16)}
    cache = LatencyCache(tmp_path / "cache.sqlite")
    first, cached = cache.latency(target, small_onnx, shapes)
    assert not cached
    key = cache.key(graph_hash(small_onnx), shapes, target_identity(target))
    # a first window slowed tenfold, as a busy neighbour slows a whole window: the new reading wins
    # (or the one already cached, as another worker may have stored, when that is faster still)
    slowed = replace(first, min_ms=first.min_ms * 10, p50_ms=first.p50_ms * 10)
    kept, second = cache.recheck(target, small_onnx, shapes, slowed, "min")
    assert second.min_ms < slowed.min_ms and kept == min(second, first, key=lambda s: s.min_ms) == cache.get(key)
    # on the p50 too
    kept, second = cache.recheck(target, small_onnx, shapes, slowed, "p50")
    assert kept != slowed and kept.p50_ms <= second.p50_ms and cache.get(key) == kept
    # a first reading faster than anything the second window can give stays, and stays cached
    quick = replace(first, min_ms=first.min_ms / 1000)
    kept, second = cache.recheck(target, small_onnx, shapes, quick, "min")
    assert kept == quick and second.min_ms > quick.min_ms and cache.get(key) == quick


def test_a_rewritten_file_is_hashed_again(small_onnx, tmp_path):
    """The graph hash is remembered per file version (a rechecked trial asks twice), never reused for
    a file rewritten since."""
    import shutil

    import onnx

    from autocomp.latency import graph_hash

    path = tmp_path / "m.onnx"
    shutil.copy(small_onnx, path)
    before = graph_hash(path)
    assert graph_hash(path) == before == graph_hash(small_onnx)
    model = onnx.load(str(path))
    model.graph.node.pop()  # another graph in the same file
    model.graph.output[0].name = model.graph.node[-1].output[0]
    onnx.save(model, str(path))
    assert graph_hash(path) != before
