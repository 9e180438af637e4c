"""Benchmark of the README's main command on a fresh cache: `autocomp search --target cpu --max-drop 0.02`.

Runs the command exactly as a user would (a subprocess, an empty model cache so the built-in model
is trained first), times it end to end, and records the Pareto set's figures from its pareto.json
into benchmarks/default_search.json and .md, with the machine's load average before and after.

    python benchmarks/default_search.py [--out results/bench-default] [-- extra search args]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autocomp.results import reported_latency_ms

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench-default"))
    parser.add_argument("extra", nargs="*", help="extra arguments for autocomp search")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    command = [sys.executable, "-m", "autocomp.cli", "search", "--target", "cpu", "--max-drop", "0.02",
               "--out", str(args.out), "--json", *args.extra]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "AUTOCOMP_CACHE_DIR": cache}
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        load_after = os.getloadavg()
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
        return proc.returncode
    summary = json.loads(proc.stdout)
    base = summary["baseline"]
    members = summary["pareto"]
    feasible = [m for m in members if m["drop"] <= 0.02]
    fastest = max(feasible, key=lambda m: m.get("final_speedup", m["speedup"])) if feasible else None
    record = {
        "command": "autocomp search --target cpu --max-drop 0.02" + (" " + " ".join(args.extra) if args.extra else ""),
        "wall_s": round(wall_s, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "exit_code": proc.returncode,
        "trials": summary["trials"],
        "latency_statistic": summary.get("latency_statistic", "p50"),
        "baseline": {"accuracy": base["metric"], "test_accuracy": base.get("test_metric"),
                     "latency_ms": base.get("latency_ms"), "latency_p50_ms": base["latency_p50_ms"],
                     "final_latency_ms": base.get("final_latency_ms"), "final_latency_p50_ms": base.get("final_latency_p50_ms"),
                     "size_bytes": base["size_bytes"], "macs": base.get("macs")},
        "pareto": [{k: m.get(k) for k in ("trial", "metric", "drop", "test_metric", "test_drop", "latency_ms",
                                          "latency_p50_ms", "speedup",
                                          "final_latency_ms", "final_latency_p50_ms", "final_speedup", "size_bytes",
                                          "macs")}
                   for m in members],
        "fastest_feasible": fastest and {"trial": fastest["trial"], "accuracy": fastest["metric"],
                                         "drop_points": round(100 * fastest["drop"], 2),
                                         "speedup_side_by_side": fastest.get("final_speedup"),
                                         "speedup_during_search": fastest["speedup"]},
        "facts": summary.get("target"),
    }
    (HERE / "default_search.json").write_text(json.dumps(record, indent=2) + "\n")
    stat = record["latency_statistic"]

    def _pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    def _ms(record: dict, which: str = "") -> float:
        """The side-by-side figure where there is one, else the search's (``which="p50"``: the p50)."""
        return reported_latency_ms(record, p50=which == "p50" or stat == "p50")

    lines = [
        "# Default search on the built-in workload",
        "",
        f"Command: `{record['command']}` (fresh model cache: the built-in model is trained first).",
        f"Produced by `python benchmarks/default_search.py`. Wall time **{record['wall_s']:.0f} s**; "
        f"load average before {record['load_average_before']}, after {record['load_average_after']} (2 cores).",
        "",
        f"Latency statistic: **{stat}** (`--latency-statistic`; `min` is each measurement's fastest run). "
        f"Base model: accuracy {100 * base['metric']:.2f} %, {stat} {_ms(base):.3f} ms, p50 {_ms(base, 'p50'):.3f} ms "
        f"(single thread, ONNX Runtime), {base.get('macs', 0) / 1e6:.1f} M MACs; accuracy on the held-out test "
        f"split {_pct(base.get('test_metric'))} %.",
        "",
        f"| trial | accuracy % | drop (pts) | test accuracy % | {stat} ms (side by side) | p50 ms (side by side) "
        "| speedup (side by side) | speedup (in search) | MACs (M) | size KiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in members:
        lines.append(f"| {m['trial']} | {100 * m['metric']:.2f} | {100 * m['drop']:.2f} | {_pct(m.get('test_metric'))} | "
                     f"{_ms(m):.3f} | {_ms(m, 'p50'):.3f} | "
                     f"{m.get('final_speedup') or m['speedup']:.2f}x | {m['speedup']:.2f}x | "
                     f"{(m.get('macs') or 0) / 1e6:.1f} | {m['size_bytes'] / 1024:.0f} |")
    if fastest:
        lines += ["", f"Fastest feasible model: trial {fastest['trial']}, {100 * fastest['drop']:.2f} points of drop, "
                  f"**{fastest.get('final_speedup') or fastest['speedup']:.2f}x** faster than the base model "
                  f"({stat}, both measured side by side by the same harness on the exported artifacts)."]
    lines += ["", f"Trials: {summary['trials']}.", ""]
    (HERE / "default_search.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
