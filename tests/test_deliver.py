"""autocomp.deliver (which member `autocomp export` picks) and autocomp.report, on hand-written runs;
tests/test_search.py exports from and reports on a real run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from autocomp.compare import load_run_summary
from autocomp.deliver import NoMemberError, select_member
from autocomp.errors import ConfigError
from autocomp.report import render_report, write_report


def _run(points, **extra):
    """A pareto.json: (trial, accuracy, ms, test accuracy) members over a base model at 0.99, 1 ms."""
    members = [{"trial": t, "metric": a, "drop": 0.99 - a, "latency_ms": ms, "latency_p50_ms": 1.1 * ms,
                "speedup": 1 / ms, "size_bytes": 2048,
                "test_metric": ta, "test_drop": None if ta is None else 0.99 - ta, "artifact": f"r/trials/{t:04d}/model.onnx",
                "spec": {}, "notes": {}}
               for t, a, ms, ta in points]
    return {"run_dir": "r", "status": "complete", "workload": "digits", "metric_name": "accuracy",
            "target": {"name": "cpu", "measured": True}, "latency_statistic": "min",
            "constraints": {"max_drop": 0.02, "relative_drop": False, "max_latency_ms": None},
            "baseline": {"metric": 0.99, "test_metric": 0.99, "latency_ms": 1.0, "latency_p50_ms": 1.1,
                         "size_bytes": 4096, "artifact": "r/baseline/model.onnx"},
            "pareto": members, **extra}


RUN = _run([(4, 0.985, 0.50, 0.97), (9, 0.975, 0.25, 0.98), (2, 0.972, 0.20, 0.96)])


def _picked(**rule):
    return select_member(RUN, **rule)["trial"]


def test_the_fastest_member_within_the_bounds_or_the_most_accurate():
    assert _picked() == 2
    assert _picked(prefer="most-accurate") == 4
    assert _picked(max_drop=0.016) == 9  # 2 drops 1.8 points
    assert _picked(max_drop=0.016, split="test") == 9  # on the test split 4 drops 2, 2 drops 3 points
    assert _picked(prefer="most-accurate", split="test") == 9
    assert _picked(prefer="most-accurate", max_latency_ms=0.3) == 9
    assert _picked(max_drop=0.01, max_latency_ms=0.5) == 4  # bounds are inclusive
    assert _picked(max_drop=0.01, split="test") == 9  # 0.99 - 0.98 is a float above 0.01: still within


def test_the_drop_bound_is_absolute_whatever_the_search_was_bounded_by():
    relative = _run([(4, 0.985, 0.50, 0.97), (9, 0.975, 0.25, 0.98), (2, 0.972, 0.20, 0.96)])
    relative["constraints"]["relative_drop"] = True
    for member in relative["pareto"]:
        member["drop"] = member["test_drop"] = 0.5  # whatever the search recorded, the metrics decide
    assert select_member(relative, max_drop=0.016)["trial"] == 9
    assert select_member(relative, max_drop=0.016, split="test")["trial"] == 9
    page = _report(relative)
    assert "<td>1.50</td>" in page and "50.00" not in page  # the table's drop, in points


def test_ties_go_to_the_more_accurate_then_the_faster_then_the_lower_trial():
    run = _run([(5, 0.97, 0.2, 0.97), (3, 0.98, 0.2, 0.98), (8, 0.98, 0.1, 0.98), (1, 0.98, 0.1, 0.98)])
    assert select_member(run)["trial"] == 1
    assert select_member(run, prefer="most-accurate")["trial"] == 1


def test_the_reported_latency_is_the_side_by_side_remeasurement_where_there_is_one():
    run = _run([(4, 0.985, 0.50, 0.97), (9, 0.975, 0.25, 0.98)])
    run["pareto"][1]["final_latency_ms"] = 0.6  # re-measured slower than the search saw it
    assert select_member(run)["trial"] == 4
    assert select_member(run, max_latency_ms=0.55)["trial"] == 4


def test_a_trial_names_its_member_or_one_it_repeats():
    run = _run([(4, 0.985, 0.50, 0.97), (9, 0.975, 0.25, 0.98)])
    run["pareto"][0]["same_as"] = [11]
    assert select_member(run, trial=9)["trial"] == 9 and select_member(run, trial=11)["trial"] == 4
    with pytest.raises(ConfigError, match=r"trial 3 is not a Pareto member of r \(members: 4, 9\)"):
        select_member(run, trial=3)
    for rule in ({"max_drop": 0.1}, {"prefer": "fastest"}, {"split": "test"}):
        with pytest.raises(ConfigError, match="--trial names its member itself: give --trial or a rule"):
            select_member(run, trial=9, **rule)


def test_no_member_within_the_bounds_is_exit_1_naming_the_closest():
    with pytest.raises(NoMemberError, match=r"no Pareto member of r has a validation drop of at most 0\.10 pts and "
                                            r"a latency of at most 0\.3 ms; its fastest member, trial 2") as info:
        select_member(RUN, max_drop=0.001, max_latency_ms=0.3)
    assert info.value.exit_code == 1
    with pytest.raises(NoMemberError, match="r has no Pareto member: nothing met its search's constraints"):
        select_member(_run([]))


@pytest.mark.parametrize("rule, message", [
    ({"max_drop": -0.1}, "--max-drop must be >= 0"),
    ({"max_latency_ms": 0}, "--max-latency must be > 0"),
    ({"prefer": "smallest"}, "prefer must be one of fastest, most-accurate"),
    ({"split": "train"}, "split must be one of validation, test"),
])
def test_a_bad_rule_is_a_configuration_error(rule, message):
    with pytest.raises(ConfigError, match=message):
        select_member(RUN, **rule)


def test_the_test_split_is_refused_when_a_member_or_the_base_has_no_test_metric():
    run = _run([(4, 0.985, 0.50, 0.97), (9, 0.975, 0.25, None)])
    with pytest.raises(ConfigError, match=r"member\(s\) \[9\] have no test metric"):
        select_member(run, split="test")
    assert select_member(run)["trial"] == 9
    run = _run([(4, 0.985, 0.50, 0.97)])
    run["baseline"]["test_metric"] = None
    with pytest.raises(ConfigError, match="the base model has no test metric"):
        select_member(run, split="test")


def test_a_moved_run_reads_its_artifacts_where_they_are_now(tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "run.json").write_text("{}")
    (moved / "pareto.json").write_text(json.dumps({**RUN, "run_dir": "results/r"} | {
        "pareto": [{**m, "artifact": m["artifact"].replace("r/", "results/r/", 1)} for m in RUN["pareto"]]
        + [{**RUN["pareto"][0], "trial": 7, "artifact": "/elsewhere/model.onnx"}]}))
    summary = load_run_summary(moved)
    assert [m["artifact"] for m in summary["pareto"]] == [
        str(moved / "trials/0004/model.onnx"), str(moved / "trials/0009/model.onnx"),
        str(moved / "trials/0002/model.onnx"), "/elsewhere/model.onnx"]  # not under the run: left as written
    assert summary["baseline"]["artifact"] == RUN["baseline"]["artifact"]  # written under "r", not "results/r"


def _report(summary, points=()):
    """The page as it would lie in the run directory ("r")."""
    return render_report(summary, {"started": "2026-12-07T00:00:00+00:00", "versions": {"autocomp": "0.1"}},
                         list(points), Path("r"))


def test_the_report_plots_every_scored_candidate_and_describes_every_member():
    run = _run([(4, 0.985, 0.50, 0.97), (9, 0.975, 0.25, 0.98)])
    run["pareto"][1]["notes"] = {"prune_channels": {"stem": [16, 8], "layer1.0": [32, 24]}, "int8_layers": 5}
    run["pareto"][1]["spec"] = {"quantize": {"stem": "int8"}}
    run["pareto"][1]["skipped"] = [["prune", "head", "the final classifier is kept"]]
    points = [{"name": "0000", "metric": 0.95, "latency_ms": 0.3, "feasible": False},
              {"name": "0004", "metric": 0.985, "latency_ms": 0.5, "feasible": True},
              {"name": "0009/sibling-quantize", "metric": 0.975, "latency_ms": 0.25, "feasible": True}]
    page = _report(run, points)
    svg = page[page.index("<svg"):page.index("</svg>")]
    # one small circle per scored candidate, one large per member, one square for the base model
    assert len(re.findall(r'r="3.5"', svg)) == 3 and len(re.findall(r'r="5.5"', svg)) == 2
    assert svg.count("<rect") == 2 and "base model: 99.00 %" in svg
    assert "outside the constraints" in svg and svg.count("stroke-dasharray") == 1  # the budget; no latency bound
    assert 'id="trial-4"' in page and 'id="trial-9"' in page
    assert "<td>layer1.0</td><td>32</td><td>24</td>" in page and "75 %" in page  # channels kept per layer
    assert "int8_layers" in page and "the final classifier is kept" in page and "<td>stem</td><td>int8</td>" in page
    assert 'href="trials/0009/model.onnx"' in page  # relative to the run directory, where the report lies
    assert "status <b>complete</b>" in page and "resume" not in page


def test_the_report_escapes_what_it_shows_and_says_an_unfinished_run_is_unfinished():
    run = _run([(4, 0.985, 0.50, 0.97)], workload="<script>x</script>", status="interrupted")
    run["pareto"][0]["notes"] = {"<b>": "<i>"}
    run["constraints"]["max_latency_ms"] = 0.6
    page = _report(run)
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "<i>" not in page
    assert "status <b>interrupted</b> (not re-measured side by side; resume the search" in page
    assert page.count("stroke-dasharray") == 2  # the budget and the latency bound
    empty = _report(_run([]))
    assert "No candidate met the constraints." in empty and 'r="5.5"' not in empty


def test_a_report_needs_a_run_summary(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        write_report(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not an autocomp run directory"):
        write_report(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="has not written a summary yet"):
        write_report(tmp_path)
    (tmp_path / "pareto.json").write_text("{")
    with pytest.raises(ConfigError, match="not readable JSON"):
        write_report(tmp_path)
    (tmp_path / "pareto.json").write_text(json.dumps(RUN))
    assert write_report(tmp_path).read_text().startswith("<!doctype html>")
    (tmp_path / "pages").mkdir()
    assert write_report(tmp_path, tmp_path / "pages") == tmp_path / "pages" / "report.html"  # a directory: into it


def test_the_search_table_gives_the_drop_in_points_for_a_relative_budget_too(tmp_path):
    import io

    from rich.console import Console

    from autocomp.cli import _print_summary

    run = _run([(9, 0.975, 0.25, 0.98)], run_dir=str(tmp_path),
               trials={"complete": 1, "failed": 0, "feasible": 1, "rejected_before_training": 0})
    run["constraints"]["relative_drop"] = True
    run["pareto"][0]["drop"] = (0.99 - 0.975) / 0.99  # what a --relative-drop search records
    out = io.StringIO()
    _print_summary(Console(file=out, width=200), run)
    rows = [[cell.strip() for cell in line.replace("┃", "│").split("│")[1:-1]]
            for line in out.getvalue().splitlines() if "│" in line or "┃" in line]
    header = next(r for r in rows if r[0] == "trial")
    [member] = [r for r in rows if r[0] == "9"]
    assert member[header.index("drop (pts)")] == "1.50"  # not 1.52, the fraction of the base in percent
