"""Benchmark: is one joint search over every method better than single-method searches?

Runs three searches on the built-in workload with the same trial budget: pruning alone
(benchmarks/spaces/prune_only.toml, with the same recovery), quantization alone
(benchmarks/spaces/quantize_only.toml) and all methods jointly (search_spaces/joint.toml). Then it
re-measures the base model and every Pareto member of the three runs side by side, in interleaved
rounds (median of rounds), so the fronts are compared under the same machine load, and computes:

- each front (accuracy up, latency down, drop <= max-drop) from those side-by-side latencies,
- its hypervolume, with the reference point (base accuracy - max drop, base latency),
- whether every point of each single-method front is weakly dominated by a point of the joint front,

once with the validation accuracy each search selected its front on and once with the accuracy of
the same artifacts on the workload's held-out test split, which no search saw.

    python benchmarks/joint_vs_single.py [--trials 20] [--rounds 5] [--seed 0] [--target cpu]

Writes benchmarks/joint_vs_single.json and .md (``joint_vs_single_TARGET.*`` for another target,
``..._seedN.*`` for another seed; the hand-written reading and the table of runs stay in the first).
With a predicted target (``jetson`` ...) nothing is re-measured: a prediction is the same every time,
so each search's own latencies are compared. Measured targets other than ``cpu`` are refused (the
re-measurement runs on this host).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPACES = {
    "prune": HERE / "spaces" / "prune_only.toml",
    "quantize": HERE / "spaces" / "quantize_only.toml",
    "joint": ROOT / "search_spaces" / "joint.toml",
}


def hypervolume(points: list[tuple[float, float]], ref_accuracy: float, ref_latency: float) -> float:
    """Area dominated by ``points`` (accuracy up, latency down) and bounded by the reference point."""
    useful = sorted((lat, acc) for acc, lat in points if acc > ref_accuracy and lat < ref_latency)
    area, best_acc = 0.0, ref_accuracy
    # sweep from the fastest point: over [its latency, the next point's) the best accuracy reached so far counts
    for i, (lat, acc) in enumerate(useful):
        right = useful[i + 1][0] if i + 1 < len(useful) else ref_latency
        best_acc = max(best_acc, acc)
        area += (right - lat) * (best_acc - ref_accuracy)
    return area


def weakly_dominates(q: dict, p: dict, key: str = "accuracy") -> bool:
    """``q`` is at least as accurate (by ``key``) and at least as fast as ``p``."""
    return q[key] >= p[key] and q["latency_ms"] <= p["latency_ms"]


def pareto_front(points: list[dict], key: str = "accuracy") -> list[dict]:
    # p leaves the front when some q is at least as good in both and strictly better in one
    front = [p for p in points
             if not any(weakly_dominates(q, p, key) and not weakly_dominates(p, q, key) for q in points)]
    return sorted(front, key=lambda p: p["latency_ms"])


def compare(points: dict[str, list[dict]], key: str, ref_accuracy: float, base_ms: float) -> dict:
    """Fronts by accuracy ``key``, their hypervolumes, the single-method points the joint front
    weakly dominates, and the fastest point of each front within the accuracy budget."""
    fronts = {name: pareto_front(p, key) for name, p in points.items()}
    volumes = {name: hypervolume([(p[key], p["latency_ms"]) for p in f], ref_accuracy, base_ms)
               for name, f in fronts.items()}
    dominance = {name: {"points": len(fronts[name]),
                        "dominated_by_joint": sum(any(weakly_dominates(q, p, key) for q in fronts["joint"])
                                                  for p in fronts[name])}
                 for name in ("prune", "quantize")}
    fastest = {name: max((p["speedup"] for p in f if p[key] >= ref_accuracy), default=None)
               for name, f in fronts.items()}
    return {"accuracy": key, "reference_point": {"accuracy": ref_accuracy, "latency_ms": base_ms},
            "fronts": fronts, "hypervolume": volumes, "joint_dominates": dominance,
            "fastest_feasible_speedup": fastest}


#: The heading from which benchmarks/joint_vs_single.md is written by hand (kept on a re-run).
KEEP = "## What this shows"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="every search's --seed (sampler and fine-tuning); "
                        "another seed than 0 writes joint_vs_single[_TARGET]_seedN.md/.json")
    parser.add_argument("--target", default="cpu",
                        help="every search's --target; a predicted one (jetson ...) is not re-measured, its "
                             "predictions are deterministic (results go to joint_vs_single_TARGET.md/.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the searches go (default results/bench-joint, or results/bench-joint-TARGET)")
    parser.add_argument("--reuse", nargs="*", choices=sorted(SPACES), default=[], metavar="SEARCH",
                        help="reuse these finished searches from --out instead of running them again (they "
                             "must have the same target, seed and trials; a measured target's fronts are still "
                             "re-measured side by side with the others)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "results" / ("bench-joint" if args.target == "cpu" else f"bench-joint-{args.target}")
    from autocomp.plugins import load_registry

    measured_target = load_registry().target(args.target).measured
    if args.target != "cpu" and measured_target:
        parser.error(f"--target {args.target} is measured, and the side-by-side re-measurement runs on this host; "
                     "use cpu or a predicted target")

    from autocomp.ort import TimingPolicy, host_facts, measure_latency

    wanted = {"target": args.target, "seed": args.seed, "trials": args.trials}
    for name in args.reuse:  # all checked before any search runs (a search replaces its directory)
        manifest = args.out / name / "run.json"
        if not (args.out / name / "pareto.json").exists() or not manifest.exists():
            parser.error(f"--reuse {name}: no finished search in {args.out / name}; run without --reuse {name} first")
        config = json.loads(manifest.read_text())["config"]
        found = {k: config.get(k) for k in wanted}
        if found != wanted:
            parser.error(f"--reuse {name}: {args.out / name} was searched with {found}, not {wanted}; "
                         f"run without --reuse {name}")
    runs = {}
    for name, space in SPACES.items():
        out = args.out / name
        if name in args.reuse:
            wall = out / "benchmark_wall_s.json"
            runs[name] = {"summary": json.loads((out / "pareto.json").read_text()), "reused": True,
                          "wall_s": json.loads(wall.read_text()) if wall.exists() else float("nan")}
            print(f"{name}: reused {out}", flush=True)
            continue
        if out.exists():
            shutil.rmtree(out)
        command = [sys.executable, "-m", "autocomp.cli", "search", "--target", args.target, "--max-drop", str(args.max_drop),
                   "--trials", str(args.trials), "--seed", str(args.seed), "--space", str(space), "--out", str(out),
                   "--json"]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode not in (0, 1):
            sys.stderr.write(proc.stderr)
            return proc.returncode
        runs[name] = {"summary": json.loads(proc.stdout), "wall_s": round(time.perf_counter() - start, 1)}
        (out / "benchmark_wall_s.json").write_text(json.dumps(runs[name]["wall_s"]))
        print(f"{name}: {runs[name]['wall_s']} s, {len(runs[name]['summary']['pareto'])} Pareto members", flush=True)

    base = runs["joint"]["summary"]["baseline"]
    shapes = {"input": [1, 1, 32, 32]}
    artifacts = [("base", None, Path(base["artifact"]), base["metric"], base)]
    for name, run in runs.items():
        for m in run["summary"]["pareto"]:
            artifacts.append((name, m["trial"], Path(m["artifact"]), m["metric"], m))
    load_before = load_after = os.getloadavg()
    if measured_target:
        # each measurement's fastest run, the statistic the searches optimise (their default); the p50s
        # of the same measurements are recorded beside it
        from autocomp.latency import interleaved

        measured = interleaved(artifacts, lambda a: measure_latency(a[2], shapes, TimingPolicy()), args.rounds)
        load_after = os.getloadavg()
        samples = [[s.value("min") for s in row] for row in measured]
        p50s = [[s.p50_ms for s in row] for row in measured]
    else:  # a prediction is the same every time: the searches' own figures
        samples = [[a[4]["latency_ms"]] for a in artifacts]
        p50s = [[a[4]["latency_p50_ms"]] for a in artifacts]
    base_ms = median(samples[0])
    ref_accuracy = base["metric"] - args.max_drop
    # the held-out test split, which no search saw: the validation accuracies that picked each front
    # are the best of many noisy draws (one validation image is 0.28 points), the test accuracies are
    # not. Each search scored its base model and Pareto members there (``test_metric``); a member it
    # could not score (fp16 on a host without fp16 kernels) is left out of the test comparison.
    base_test = base["test_metric"]
    points: dict[str, list[dict]] = {name: [] for name in runs}
    for (name, trial, path, accuracy, record), s, p50 in zip(artifacts[1:], samples[1:], p50s[1:]):
        points[name].append({"trial": trial, "accuracy": accuracy, "test_accuracy": record.get("test_metric"),
                             "latency_ms": median(s), "p50_ms": median(p50),
                             "speedup": base_ms / median(s), "spread_pct": 100 * (max(s) - min(s)) / median(s)})
    val = compare(points, "accuracy", ref_accuracy, base_ms)
    scored = {name: [p for p in ps if p["test_accuracy"] is not None] for name, ps in points.items()}
    test = compare(scored, "test_accuracy", base_test - args.max_drop, base_ms)
    record = {
        "command": f"python benchmarks/joint_vs_single.py --trials {args.trials}"
                   + (f" --rounds {args.rounds}" if measured_target else "")
                   + (f" --seed {args.seed}" if args.seed else "")
                   + (f" --target {args.target}" if args.target != "cpu" else "")
                   + (f" --reuse {' '.join(args.reuse)}" if args.reuse else ""),
        "seed": args.seed,
        "target": args.target,
        "latency": ("re-measured side by side" if measured_target else "predicted by the target (deterministic)"),
        "reused_searches": args.reuse,
        "trials_per_search": args.trials,
        "max_drop": args.max_drop,
        "host": host_facts(1),
        "load_average_during_remeasure": [list(load_before), list(load_after)] if measured_target else None,
        "latency_statistic": ("min (each measurement's fastest run; median over rounds)" if measured_target
                              else "the target's prediction"),
        "base": {"accuracy": base["metric"], "test_accuracy": base_test, "latency_ms": base_ms,
                 "p50_ms": median(p50s[0])},
        "search_wall_s": {name: run["wall_s"] for name, run in runs.items()},
        **{k: v for k, v in val.items() if k != "accuracy"},
        "test_split": test,
    }
    stem = ("joint_vs_single" + ("" if args.target == "cpu" else f"_{args.target}")
            + ("" if args.seed == 0 else f"_seed{args.seed}"))
    (HERE / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Joint search vs single-method searches",
        "",
        f"Command: `{record['command']}`; each search: `autocomp search --target {args.target} --max-drop {args.max_drop} "
        f"--trials {args.trials} --seed {args.seed} --space SPACE` on the built-in digits workload.",
        *([f"The {', '.join(args.reuse)} search(es) were reused from an earlier run of this command in the same "
           f"directory (same trial budget); their wall times are from that run."] if args.reuse else []),
        (f"Pareto members of the three runs and the base model re-measured side by side: {args.rounds} interleaved "
         f"rounds, each measurement's fastest run, median over rounds (the statistic the searches optimise; the "
         f"p50s are in the JSON; 1 thread, ONNX Runtime). Load average during re-measurement: "
         f"{[round(x, 2) for x in load_before]} -> {[round(x, 2) for x in load_after]}." if measured_target else
         f"Latencies are the target's predictions (`{args.target}` is a predicted device: the same graph always gets "
         "the same figure), as each search recorded them; nothing is re-measured."),
        "",
        f"Base: {base_ms:.3f} ms; accuracy {100 * base['metric']:.2f} % on the validation split the searches "
        f"select on, {100 * base_test:.2f} % on the held-out test split none of them saw. Hypervolume in "
        "accuracy x ms, reference point (base accuracy - max drop, base latency), on each split.",
    ]
    for title, result in (("Validation split (what the searches selected on)", val),
                          ("Held-out test split (the same artifacts; no search saw it)", test)):
        key = result["accuracy"]
        lines += ["", f"### {title}", "",
                  "| search | wall s | front size | hypervolume | fastest feasible speedup | "
                  "front points dominated by the joint front |", "|---|---:|---:|---:|---:|---:|"]
        for name in ("prune", "quantize", "joint"):
            dom = result["joint_dominates"].get(name)
            fastest = result["fastest_feasible_speedup"][name]
            lines.append(f"| {name} | {runs[name]['wall_s']:.0f} | {len(result['fronts'][name])} | "
                         f"{result['hypervolume'][name]:.5f} | {'-' if fastest is None else f'{fastest:.2f}x'} | "
                         f"{'-' if dom is None else str(dom['dominated_by_joint']) + ' of ' + str(dom['points'])} |")
        lines += ["", "Fronts (accuracy %, ms, speedup):", ""]
        for name in ("prune", "quantize", "joint"):
            lines.append(f"- {name}: " + "; ".join(f"trial {p['trial']}: {100 * p[key]:.2f} %, {p['latency_ms']:.3f} ms, "
                                                  f"{p['speedup']:.2f}x" for p in result["fronts"][name]))
    lines.append("")
    # the hand-written reading of the figures and the table of earlier runs stay
    previous = (HERE / f"{stem}.md").read_text() if (HERE / f"{stem}.md").exists() else ""
    if KEEP in previous:
        lines.append(previous[previous.index(KEEP):].rstrip("\n") + "\n")
    (HERE / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
