"""autocomp.compare on hand-written run summaries: which baseline members a new run keeps."""

from __future__ import annotations

import json

import pytest

from autocomp.compare import compare_runs, load_run_summary
from autocomp.errors import ConfigError


def _run(points, base_ms=1.0, **extra):
    """A pareto.json: (trial, accuracy, ms[, test accuracy]) members over a base model of ``base_ms``."""
    return {"run_dir": "r", "status": "complete", "workload": "digits", "metric_name": "accuracy",
            "target": {"name": "cpu"}, "latency_statistic": "min", "constraints": {"max_drop": 0.02},
            "baseline": {"metric": 0.99, "test_metric": 0.99, "latency_ms": base_ms, "params": 100, "macs": 1000},
            "pareto": [{"trial": t, "metric": a, "latency_ms": ms, "test_metric": rest[0] if rest else a}
                       for t, a, ms, *rest in points], **extra}


BASE = _run([(1, 0.98, 0.50), (2, 0.97, 0.25), (3, 0.95, 0.10)])


def _kept(report):
    return {p["trial"]: p["best_new_trial"] if p["kept"] else None for p in report["points"]}


def test_each_member_is_kept_by_the_most_accurate_new_member_fast_enough():
    new = _run([(7, 0.98, 0.52), (8, 0.975, 0.20), (9, 0.94, 0.09)])
    report = compare_runs(BASE, new, max_metric_loss=0.0, max_slowdown=0.05)
    # 0.52 ms is within 5 % of 0.50; trial 8 is faster than 0.25 and more accurate; nothing as fast
    # as 0.10 ms (0.105 with the tolerance) reaches 0.95: trial 9 lacks 0.01
    assert _kept(report) == {1: 7, 2: 8, 3: None} and report["lost"] == 1 and report["regressed"]
    [lost] = [p for p in report["points"] if not p["kept"]]
    assert lost["best_new_trial"] == 9 and lost["shortfall"] == pytest.approx(0.01)
    # the same run with a point of tolerance keeps it
    assert not compare_runs(BASE, new, max_metric_loss=0.01 + 1e-9, max_slowdown=0.05)["regressed"]
    # without the latency tolerance trial 1 is lost too: nothing within 0.50 ms reaches 0.98
    report = compare_runs(BASE, new, max_metric_loss=0.0, max_slowdown=0.0)
    assert _kept(report) == {1: None, 2: 8, 3: None}
    assert report["points"][0]["shortfall"] == pytest.approx(0.98 - 0.975)


def test_nothing_as_fast_and_an_empty_front():
    report = compare_runs(BASE, _run([(7, 0.99, 0.30)]), max_metric_loss=0.0, max_slowdown=0.0)
    assert _kept(report) == {1: 7, 2: None, 3: None}
    assert [p["shortfall"] for p in report["points"][1:]] == [None, None]  # no new member that fast
    assert compare_runs(BASE, _run([]))["lost"] == 3
    assert compare_runs(_run([]), BASE) ["points"] == []  # an empty baseline loses nothing


def test_by_speedup_cancels_a_uniformly_slower_host():
    slower = _run([(7, 0.98, 1.0), (8, 0.97, 0.5), (9, 0.95, 0.2)], base_ms=2.0)  # everything twice as slow
    assert compare_runs(BASE, slower, max_metric_loss=0.0, max_slowdown=0.0)["lost"] == 3
    assert compare_runs(BASE, slower, max_metric_loss=0.0, max_slowdown=0.0, by="speedup")["lost"] == 0
    other_base = _run([(7, 0.98, 1.0)], base_ms=2.0)
    other_base["baseline"]["params"] = 50
    with pytest.raises(ConfigError, match="base models differ"):
        compare_runs(BASE, other_base, by="speedup")


def test_the_test_split_is_compared_when_asked():
    new = _run([(7, 0.98, 0.50, 0.96), (8, 0.97, 0.25), (9, 0.95, 0.10)])
    assert compare_runs(BASE, new, max_metric_loss=0.0, max_slowdown=0.0)["lost"] == 0
    report = compare_runs(BASE, new, max_metric_loss=0.0, max_slowdown=0.0, split="test")
    # on test trial 7 scores 0.96: the best within 0.50 ms is trial 8's 0.97
    assert _kept(report) == {1: None, 2: 8, 3: 9}
    assert report["points"][0]["best_new_trial"] == 8 and report["points"][0]["shortfall"] == pytest.approx(0.01)


def test_runs_that_cannot_be_compared_are_refused():
    for change, message in (({"workload": "faces"}, "differ in workload"),
                            ({"target": {"name": "jetson"}}, "differ in target"),
                            ({"latency_statistic": "p50"}, "differ in latency statistic")):
        with pytest.raises(ConfigError, match=message):
            compare_runs(BASE, {**BASE, **change})
    no_test = _run([(7, 0.98, 0.5)])
    no_test["pareto"][0]["test_metric"] = None
    with pytest.raises(ConfigError, match=r"member\(s\) \[7\] have no test metric"):
        compare_runs(BASE, no_test, split="test")
    with pytest.raises(ConfigError, match="tolerances"):
        compare_runs(BASE, BASE, max_metric_loss=-0.1)


def test_a_run_directory_that_is_not_a_finished_readable_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="has not finished"):
        load_run_summary(run)
    (run / "pareto.json").write_text(json.dumps({**BASE, "pareto": [{"trial": 1, "metric": 0.9}]}))
    with pytest.raises(ConfigError, match="not a pareto.json this version can read"):
        load_run_summary(run)
    (run / "pareto.json").write_text(json.dumps(BASE))
    assert load_run_summary(run)["run_dir"] == str(run)  # the path given, not the one written
