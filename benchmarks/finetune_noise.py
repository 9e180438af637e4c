"""Benchmark: how far one setting's accuracy moves with the fine-tuning seed alone.

Every trial of a search fine-tunes its candidate with its own seed, and the search keeps the best
point it saw at each latency. The accuracy of a front point is therefore the best of several noisy
draws, and a search that spends more trials near a setting draws more often there. This script
measures the size of one draw's noise: it runs one fixed setting (``--space``, by default uniform
50 % pruning with the recovery of ``spaces/prune_only.toml`` at mid-range temperature and weight)
for ``--trials`` trials, which differ only in their fine-tuning seed, and records each one's
accuracy on the validation split the searches select on (the search's own score) and its artifact's
on the held-out test split none of them sees.

    python benchmarks/finetune_noise.py --trials 24

Writes ``benchmarks/finetune_noise.md`` and ``.json`` (``--name NAME`` for others); the searches go
to ``results/finetune-noise`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import StatisticsError, correlation, median, pstdev

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The heading from which finetune_noise.md is written by hand (kept on a re-run).
KEEP = "## What this shows"


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's correlation of ``xs`` and ``ys``; NaN when either does not vary."""
    try:
        return correlation(xs, ys)
    except StatisticsError:
        return float("nan")


def score_run(run: Path, test) -> list[dict]:
    """Every complete trial of ``run`` (a --keep-all run): its validation accuracy (the study's) and
    its artifact's accuracy on the ``test`` split."""
    import optuna

    from autocomp.ort import run_batches

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{run / 'study.db'}")
    draws = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        model = run / "trials" / f"{t.number:04d}" / "model.onnx"
        accuracy = float((run_batches(model, test.inputs.numpy()).argmax(1) == test.targets.numpy()).mean())
        draws.append({"trial": t.number, "val": t.values[0], "test": accuracy, "latency_ms": t.values[1]})
    return draws


def summarise(draws: list[dict], images: dict[str, int]) -> dict:
    out = {"draws": len(draws)}
    for split in ("val", "test"):
        xs = [100 * d[split] for d in draws]
        out[split] = {"images": images[split], "one_image_pts": 100 / images[split], "median": median(xs),
                      "sd": pstdev(xs), "min": min(xs), "max": max(xs)}
    out["val_test_correlation"] = pearson([d["val"] for d in draws], [d["test"] for d in draws])
    return out


def markdown(record: dict, kept: str) -> str:
    s = record["summary"]
    lines = [
        "# Fine-tuning noise: one setting, many seeds",
        "",
        f"Command: `{record['command']}`; the search: `{record['search']}`.",
        f"Space ({record['space']}):",
        "",
        "```toml",
        record["space_text"].strip(),
        "```",
        "",
        f"{s['draws']} trials of that one setting, differing only in the fine-tuning seed "
        f"({record['wall_s']:.0f} s; host: {record['host']}). Base model: {100 * record['base_val']:.2f} % on "
        f"validation, {100 * record['base_test']:.2f} % on test.",
        "",
        "| split | images | one image | median | sd | min | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, label in (("val", "validation"), ("test", "test")):
        x = s[split]
        lines.append(f"| {label} | {x['images']} | {x['one_image_pts']:.2f} pts | {x['median']:.2f} % | "
                     f"{x['sd']:.2f} pts | {x['min']:.2f} % | {x['max']:.2f} % |")
    lines += ["", f"Correlation of a draw's validation and test accuracy: {s['val_test_correlation']:.2f}.", "",
              "Draws (trial: validation %, test %): " + "; ".join(
                  f"{d['trial']}: {100 * d['val']:.2f}, {100 * d['test']:.2f}" for d in record["draws"]), ""]
    return "\n".join(lines) + ("\n" + kept if kept else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", type=Path, default=HERE / "spaces" / "uniform_prune_50.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "finetune-noise")
    parser.add_argument("--name", default="finetune_noise", help="stem of the .md/.json written in benchmarks/")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    command = [sys.executable, "-m", "autocomp.cli", "search", "--space", str(args.space), "--trials",
               str(args.trials), "--seed", str(args.seed), "--keep-all", "--no-siblings", "--max-drop", "1.0",
               "--out", str(args.out), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    wall = time.perf_counter() - start
    summary = json.loads(proc.stdout)
    from autocomp.ort import host_facts
    from autocomp_plugins.digits import load_digits_splits

    _, val, test = load_digits_splits()
    draws = score_run(args.out, test)
    record = {
        "command": " ".join(["python benchmarks/finetune_noise.py", *(argv if argv is not None else sys.argv[1:])]),
        "search": " ".join(["autocomp", *command[3:]]).replace(str(ROOT) + "/", ""),
        "space": str(args.space.resolve().relative_to(ROOT)) if args.space.resolve().is_relative_to(ROOT) else str(args.space),
        "space_text": args.space.read_text(),
        "wall_s": wall,
        "host": host_facts(1)["cpu_model"],
        "base_val": summary["baseline"]["metric"],
        "base_test": summary["baseline"]["test_metric"],
        "summary": summarise(draws, {"val": len(val), "test": len(test)}),
        "draws": draws,
    }
    md = HERE / f"{args.name}.md"
    previous = md.read_text() if md.exists() else ""
    text = markdown(record, previous[previous.index(KEEP):] if KEEP in previous else "")
    (HERE / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
