"""Benchmark summary: does the joint search's *typical* front dominate the single-method ones?

One run of ``benchmarks/joint_vs_single.py`` compares one front of each search, and each front is
one draw of a stochastic search: which pruning ratios the sampler tried, and how well each
candidate's fine-tuning happened to go (one validation image is 0.28 points). Whether one search
beats another is a statement about the distribution of its fronts. The standard tool for that is
the *attainment function* (Fonseca and Fleming, 1996; Knowles, 2005): a goal (accuracy a,
speedup s) is attained by a run when its front has a point at least as accurate and at least as
fast. The *median attainment surface* of k runs bounds the goals attained by more than half of them;
a search whose median surface covers another's attains, in most runs, everything the other attains
in most runs.

This script reads the records of several seeds of ``joint_vs_single.py`` (the same trial budget,
host and code), computes each search's median attainment surface on both splits, in accuracy and
speedup over the run's own base model (each run re-measured its fronts beside its own base model),
and whether the joint search's median surface attains every corner of the others' (the bar of
issue 3, stated for stochastic searches). It also counts, per seed, the single-method points the
joint front of that very seed dominates, and for each one it does not, how many points of accuracy
the joint front lacks at that speed (one image is 0.28 points on either split of the built-in
workload). Last, it applies the bar to every pair of runs, any seeds, and to each search against
itself (two runs that only the seed tells apart), which says how often one stochastic run's front
can be expected to dominate another's at all.

    python benchmarks/joint_attainment.py benchmarks/joint_vs_single.json benchmarks/joint_vs_single_seed1.json ...

Writes ``benchmarks/joint_attainment.md`` and ``.json`` (``--out STEM`` for others).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
SEARCHES = ("prune", "quantize", "joint")
SPLITS = {"validation": ("accuracy", None), "test": ("test_accuracy", "test_split")}
#: The heading from which joint_attainment.md is written by hand (kept on a re-run).
KEEP = "## What this shows"
#: The stem of the .md/.json written without --out (the Command line names --out only otherwise).
DEFAULT_OUT = "joint_attainment"


def attains(front: list[dict], key: str, goal: tuple[float, float]) -> bool:
    """Whether ``front`` has a point at least as accurate (by ``key``) and at least as fast as ``goal``
    = (accuracy, speedup)."""
    accuracy, speedup = goal
    return any(p[key] >= accuracy and p["speedup"] >= speedup for p in front)


def shortfalls(front: list[dict], joint: list[dict], key: str, floor: float = float("-inf")) -> list[float]:
    """For each point of ``front`` within the budget (accuracy by ``key`` >= ``floor``) the joint
    front does not attain, by how much the most accurate joint point at least as fast falls short
    of it in accuracy (infinite when no joint point is that fast), in the order of ``front``."""
    out = []
    for p in front:
        best = max((q[key] for q in joint if q["speedup"] >= p["speedup"]), default=float("-inf"))
        if p[key] >= floor and best < p[key]:
            out.append(p[key] - best)
    return out


#: (search whose front should dominate, search whose front it should dominate): the bar, and the
#: same test between two runs of one search, which only the seed tells apart
PAIRS = (("joint", "prune"), ("joint", "quantize"), ("prune", "prune"), ("joint", "joint"))


def pairwise(fronts: dict[str, list[list[dict]]], key: str, floor: float = float("-inf")) -> dict[str, dict]:
    """For each of :data:`PAIRS` (a, b): over every pair of distinct runs, one of a and one of b
    (any seeds), in how many a's front dominates every point of b's within the budget (accuracy >=
    ``floor``), and by how much accuracy the misses fall short (:func:`shortfalls`; infinite where
    b's point is faster than any point of a's)."""
    out = {}
    for a, b in PAIRS:
        runs = [(i, j) for i in range(len(fronts[a])) for j in range(len(fronts[b])) if a != b or i != j]
        missed = [shortfalls(fronts[b][j], fronts[a][i], key, floor) for i, j in runs]
        out[f"{a} over {b}"] = {"pairs": len(runs), "dominated": sum(not m for m in missed),
                                "shortfalls": sorted(x for m in missed for x in m)}
    return out


def attained_by(fronts: list[list[dict]], key: str, goal: tuple[float, float]) -> int:
    return sum(attains(front, key, goal) for front in fronts)


def median_surface(fronts: list[list[dict]], key: str, floor: float) -> list[tuple[float, float]]:
    """The corners of the median attainment surface of ``fronts`` (one per run): the goals with
    accuracy >= ``floor`` attained by more than half of the runs that no other such goal is at
    least as good as in both objectives, sorted by speedup. The surface's corners are among the
    goals that pair an accuracy of some front point with a speedup of some front point."""
    points = [p for front in fronts for p in front]
    goals = [(a, s) for a in {p[key] for p in points} if a >= floor for s in {p["speedup"] for p in points}
             if 2 * attained_by(fronts, key, (a, s)) > len(fronts)]
    corners = [g for g in goals if not any(h != g and h[0] >= g[0] and h[1] >= g[1] for h in goals)]
    return sorted(corners, key=lambda g: g[1])


def summarise(records: list[dict]) -> dict:
    """Per split: each search's median surface, how many of the single-method corners the joint
    search attains in more than half of its runs, mean hypervolumes, and per seed the single-method
    front points the same seed's joint front dominates."""
    out = {}
    for split, (key, sub) in SPLITS.items():
        parts = [r if sub is None else r[sub] for r in records]
        fronts = {name: [p["fronts"][name] for p in parts] for name in SEARCHES}
        # a goal below the budget is not a goal: the highest floor any run has (they share the base model)
        floor = max(p["reference_point"]["accuracy"] for p in parts)
        surfaces = {name: median_surface(fronts[name], key, floor) for name in SEARCHES}
        out[split] = {
            "median_surface": {name: [{"accuracy": a, "speedup": s} for a, s in surfaces[name]] for name in SEARCHES},
            "joint_median_attains": {
                name: {"corners": len(surfaces[name]),
                       "attained": sum(2 * attained_by(fronts["joint"], key, g) > len(records) for g in surfaces[name])}
                for name in ("prune", "quantize")},
            "mean_hypervolume": {name: mean(p["hypervolume"][name] for p in parts) for name in SEARCHES},
            "pairwise": pairwise(fronts, key, floor),
            "per_seed": [{"seed": r["seed"], **{name: {**p["joint_dominates"][name], "shortfalls": shortfalls(
                             p["fronts"][name], p["fronts"]["joint"], key, floor)} for name in ("prune", "quantize")}}
                         for r, p in zip(records, parts)],
        }
    return out


def _missed_by(shortfalls: list[float]) -> str:
    return f" (missed by {', '.join(f'{100 * x:.2f}' for x in shortfalls)} pts)" if shortfalls else ""


def markdown(records: list[dict], summary: dict, paths: list[Path], out: str = DEFAULT_OUT) -> str:
    hosts = sorted({r["host"]["cpu_model"] for r in records})
    stem = "" if out == DEFAULT_OUT else f" --out {out}"
    lines = ["# Joint search vs single-method searches, over seeds: median attainment surfaces", "",
             f"Command: `python benchmarks/joint_attainment.py {' '.join(str(p) for p in paths)}{stem}` "
             f"({len(records)} runs of `joint_vs_single.py`, seeds {', '.join(str(r['seed']) for r in records)}; "
             f"{records[0]['trials_per_search']} trials per search; host {', '.join(hosts)}; the runs' commands: "
             + "; ".join(f"`{r['command']}`" for r in records) + ").", "",
             "A goal (accuracy, speedup over the run's own base model, re-measured side by side) is attained by a run "
             "when its front has a point at least as good in both; a search's median surface bounds the goals "
             f"attained by more than half of its {len(records)} runs. Only goals within the accuracy budget count."]
    for split, result in summary.items():
        lines += ["", f"## {split.capitalize()} split", "",
                  "| search | mean hypervolume | median surface (accuracy %, speedup) | its corners the joint search attains in most runs | per seed: its front points the joint front dominates (each missed point: how far the joint front's most accurate point at least as fast falls short) |",
                  "|---|---:|---|---:|---|"]
        for name in SEARCHES:
            corners = "; ".join(f"{100 * g['accuracy']:.2f} %, {g['speedup']:.2f}x" for g in result["median_surface"][name])
            att = result["joint_median_attains"].get(name)
            seeds = ", ".join(f"seed {s['seed']}: {s[name]['dominated_by_joint']} of {s[name]['points']}"
                              + _missed_by(s[name]["shortfalls"]) for s in result["per_seed"]) if name != "joint" else "-"
            lines.append(f"| {name} | {result['mean_hypervolume'][name]:.5f} | {corners or '-'} | "
                         f"{'-' if att is None else str(att['attained']) + ' of ' + str(att['corners'])} | {seeds} |")
        lines += ["", "Pairs of runs, any seeds (a search against itself: two different runs), "
                  "in which the first run's front dominates every point of the second's:", "",
                  "| first run's search over second run's | pairs | pairs dominated | missed points, short by <= 0.3 pts (one image here) | by 0.3-0.6 pts | by more | faster than any point of the first run's |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for pair, p in result["pairwise"].items():
            short = [round(100 * x, 2) for x in p["shortfalls"]]
            lines.append(f"| {pair} | {p['pairs']} | {p['dominated']} | {sum(x <= 0.3 for x in short)} | "
                         f"{sum(0.3 < x <= 0.6 for x in short)} | {sum(0.6 < x < float('inf') for x in short)} | "
                         f"{sum(x == float('inf') for x in short)} |")
    return "\n".join(lines) + "\n"


def _finite(value):
    """``value`` with every infinite float replaced by None, at any depth."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="joint_vs_single*.json of the seeds to pool")
    parser.add_argument("--out", default=DEFAULT_OUT, help="stem of the .md/.json written in benchmarks/")
    args = parser.parse_args(argv)
    records = [json.loads(p.read_text(encoding="utf-8")) for p in args.records]
    budgets = {(r["trials_per_search"], r["target"], r["max_drop"]) for r in records}
    if len(budgets) != 1:
        parser.error(f"the records must share trial budget, target and max drop, got {sorted(budgets)}")
    if len({r["seed"] for r in records}) != len(records):
        parser.error("two records of the same seed: pool one run per seed")
    summary = summarise(records)
    # a shortfall with no joint point as fast is infinite: null in the JSON (strict parsers reject Infinity)
    (HERE / f"{args.out}.json").write_text(json.dumps({"records": [str(p) for p in args.records], **_finite(summary)},
                                                      indent=2) + "\n")
    text = markdown(records, summary, args.records, args.out)
    md = HERE / f"{args.out}.md"
    previous = md.read_text(encoding="utf-8") if md.exists() else ""
    if KEEP in previous:  # the hand-written reading stays
        text += "\n" + previous[previous.index(KEEP):]
    md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
