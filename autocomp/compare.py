"""Compare a new run's Pareto set with a baseline run's: did the new run lose anything?

A nightly job that refreshes a model, or a change to a search space, should not give up a trade-off
an earlier run offered. A baseline Pareto member is *kept* when the new run has a member at least
as good in both objectives, within two tolerances: the metric may be lower by at most
``max_metric_loss`` (absolute, in the metric's units) and the cost higher by at most
``max_slowdown`` (a fraction). The cost is the reported latency in ms, or with ``by="speedup"`` the
inverse of the speedup over each run's own base model, which cancels a host that became uniformly
slower or faster between the runs (the base model must then be the same one).

Two runs of one search are themselves two draws: on the built-in digits workload their fronts
differ by one or two validation images (0.28 points each) at the accurate end
(``benchmarks/joint_attainment.md``), so a metric tolerance below that flags noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autocomp.errors import ConfigError
from autocomp.results import RunDir, read_json, relocate, reported_latency_ms

__all__ = ["BY", "SPLITS", "load_run_summary", "compare_runs"]

BY = ("latency", "speedup")
#: Which metric of a Pareto member is compared: the one the search selected on, or the held-out one.
SPLITS = {"validation": "metric", "test": "test_metric"}


def load_run_summary(run_dir: Path | str, *, complete: bool = True) -> dict[str, Any]:
    """The ``pareto.json`` of a finished run directory (with ``complete=False``, of a stopped one
    too), its paths pointing where the run lies now; a :class:`ConfigError` that says what is wrong
    (no such directory, not a run, a run that has not finished) otherwise."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise ConfigError(f"{run.root}: no such run directory")
    if not run.pareto.exists():
        unfinished = ("it has not finished: resume it with `autocomp search --resume --out DIR`" if complete else
                      "its search has not written a summary yet: a search writes one when it finishes or is "
                      "stopped after measuring its base model")
        hint = unfinished if run.exists() else "it is not an autocomp run directory (no run.json)"
        raise ConfigError(f"{run.root}: no pareto.json; {hint}")
    try:
        summary = read_json(run.pareto)
    except ValueError as exc:
        raise ConfigError(f"{run.pareto}: not readable JSON ({exc})") from exc
    if not isinstance(summary, dict) or (complete and summary.get("status") != "complete"):
        status = summary.get("status") if isinstance(summary, dict) else None
        raise ConfigError(f"{run.root}: the run is {status!r}, not complete; its Pareto set was neither "
                          "re-measured nor scored on the test split. Resume it with "
                          "`autocomp search --resume --out DIR` first")
    members = summary.get("pareto")
    records = [summary.get("baseline"), *(members if isinstance(members, list) else [None])]
    if not all(isinstance(r, dict) and isinstance(r.get("metric"), (int, float)) and _latency(r) is not None
               for r in records) or not all("trial" in m for m in records[1:]):
        raise ConfigError(f"{run.pareto}: not a pareto.json this version can read (a base model and members "
                          "with a metric and a latency each)")
    relocate(summary, run.root)  # as given: the run may have moved since it was written, its artifacts with it
    return summary


def _latency(record: dict[str, Any]) -> float | None:
    try:
        return reported_latency_ms(record)
    except (StopIteration, KeyError):
        return None


def _cost(record: dict[str, Any], base: dict[str, Any], by: str) -> float:
    ms = reported_latency_ms(record)
    return ms if by == "latency" else ms / reported_latency_ms(base)


def compare_runs(baseline: dict[str, Any], new: dict[str, Any], *, max_metric_loss: float = 0.005,
                 max_slowdown: float = 0.05, by: str = "latency", split: str = "validation") -> dict[str, Any]:
    """Each Pareto member of ``baseline`` (a run's ``pareto.json``), kept by ``new`` or lost, and by
    how much the best new member at least as fast (within ``max_slowdown``) falls short of it.

    Raises :class:`ConfigError` when the runs cannot be compared: another workload, metric, target
    or latency statistic, a ``split`` one of them lacks, or a tolerance out of range.
    """
    if by not in BY:
        raise ConfigError(f"by must be one of {', '.join(BY)}, got {by!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not max_metric_loss >= 0 or not 0 <= max_slowdown < 10:
        raise ConfigError(f"tolerances must be >= 0 (the slowdown a fraction below 10), got metric loss "
                          f"{max_metric_loss!r} and slowdown {max_slowdown!r}")
    for what, get in (("workload", lambda s: s.get("workload")), ("metric", lambda s: s.get("metric_name")),
                      ("target", lambda s: (s.get("target") or {}).get("name")),
                      ("latency statistic", lambda s: s.get("latency_statistic"))):
        if get(baseline) != get(new):
            raise ConfigError(f"the runs differ in {what} ({get(baseline)!r} in {baseline.get('run_dir')}, "
                              f"{get(new)!r} in {new.get('run_dir')}): their fronts cannot be compared")
    key = SPLITS[split]
    for summary in (baseline, new):
        missing = [m["trial"] for m in summary["pareto"] if m.get(key) is None]
        if missing:
            raise ConfigError(f"{summary.get('run_dir')}: Pareto member(s) {missing} have no {split} metric (the "
                              "workload has no test split, or scoring them on it failed); compare with "
                              "--split validation")
    base_b, base_n = baseline["baseline"], new["baseline"]
    if by == "speedup":
        shape = {k: (base_b.get(k), base_n.get(k)) for k in ("params", "macs")}
        if any(a != b for a, b in shape.values()):
            raise ConfigError("--by speedup compares speedups over each run's own base model, and the two base "
                              f"models differ ({', '.join(f'{k} {a} and {b}' for k, (a, b) in shape.items())}); "
                              "compare by latency")
    points = []
    for p in baseline["pareto"]:
        budget = _cost(p, base_b, by) * (1 + max_slowdown)
        fast_enough = [q for q in new["pareto"] if _cost(q, base_n, by) <= budget]
        best = max(fast_enough, key=lambda q: (q[key], -_cost(q, base_n, by)), default=None)
        kept = best is not None and best[key] >= p[key] - max_metric_loss
        points.append({
            "trial": p["trial"], "metric": p[key], "latency_ms": reported_latency_ms(p),
            "speedup": reported_latency_ms(base_b) / reported_latency_ms(p),
            "kept": kept,
            "best_new_trial": None if best is None else best["trial"],
            "best_new_metric": None if best is None else best[key],
            # positive: how much metric the new run lacks at this speed; None: nothing as fast
            "shortfall": None if best is None else p[key] - best[key],
        })
    return {
        "baseline": baseline.get("run_dir"), "new": new.get("run_dir"),
        "by": by, "split": split, "max_metric_loss": max_metric_loss, "max_slowdown": max_slowdown,
        "base_metric": {"baseline": base_b.get(key), "new": base_n.get(key)},
        "base_latency_ms": {"baseline": reported_latency_ms(base_b), "new": reported_latency_ms(base_n)},
        # a tighter budget in the new run can lose members on purpose; the report says so
        "constraints": {"baseline": baseline.get("constraints"), "new": new.get("constraints")},
        "points": points,
        "lost": sum(not p["kept"] for p in points),
        "regressed": any(not p["kept"] for p in points),
    }
