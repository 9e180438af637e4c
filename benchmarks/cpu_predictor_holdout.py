"""Score the shipped ``cpu`` predictor on candidates it was never fitted or designed on.

``benchmarks/cpu_predictor.py`` cross-validates the predictor on its candidates, but its
features were chosen by looking at those same candidates, so its figure is optimistic. This
benchmark builds a fresh set (:func:`autocomp_plugins.cpu_calibrate.candidate_specs` with another
seed; any candidate already in ``cpu_predictor.json`` is dropped), measures each with the cpu
target's harness (interleaved rounds, each measurement's fastest run, median over rounds), and
compares with the shipped calibration's predictions, unchanged. Run
``python benchmarks/cpu_predictor_holdout.py`` (about 6 minutes at the defaults); it writes
``cpu_predictor_holdout.json`` and ``cpu_predictor_holdout.md``. ``--rescore JSON`` scores today's
calibration on the measurements an earlier run recorded, without measuring again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

from autocomp_plugins import cpu_calibrate as cc  # noqa: E402
from autocomp_plugins import cpu_predictor as cp  # noqa: E402
from cpu_predictor import _score  # noqa: E402  (benchmarks/cpu_predictor.py: one scoring for both)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="candidates to draw (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="candidate seed; cpu_predictor.py uses 0 (default 1)")
    parser.add_argument("--rescore", type=Path, metavar="JSON",
                        help="score the shipped calibration on the measurements of an earlier run's "
                             "cpu_predictor_holdout.json (its candidates are rebuilt; nothing is measured or written)")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's notices
    if args.rescore:
        return rescore(args.rescore, args.count)

    out_json = HERE / "cpu_predictor_holdout.json"
    try:  # read first: a broken file must not cost a finished run
        previous = json.loads(out_json.read_text(encoding="utf-8")) if out_json.exists() else None
    except (OSError, ValueError) as exc:
        print(f"not keeping the earlier runs of {out_json.name}: {exc}", file=sys.stderr)
        previous = None
    fitted_on = {m["key"] for m in json.loads((HERE / "cpu_predictor.json").read_text(encoding="utf-8"))["models"]}
    calibration = cp.load_calibration(threads=1)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="autocomp-holdout-") as tmp:
        specs, paths = [], []
        for spec in cc.candidate_specs(args.count, args.seed):
            if spec.key in fitted_on:
                continue
            specs.append(spec)
            paths.append(cc.build_candidate(spec, Path(tmp)))
        shapes = [{"input": spec.input_shape} for spec in specs]
        measured = cc.measure_candidates(paths, shapes, rounds=args.rounds, seed=args.seed,
                                         progress=lambda m: print(m, file=sys.stderr, flush=True))
        predicted = [cp.predict_latency_ms(p, s, calibration) for p, s in zip(paths, shapes)]
    models = [{"spec": spec.describe(), "key": spec.key, "family": spec.family, "precision": spec.precision,
               "round_min_ms": m["round_min_ms"], "measured_ms": m["min_ms"], "predicted_ms": p}
              for spec, m, p in zip(specs, measured, predicted)]
    errors = [m["predicted_ms"] / m["measured_ms"] - 1 for m in models]
    groups = {f"{key} {value}": _score([e for m, e in zip(models, errors) if m[key] == value])
              for key in ("precision", "family") for value in sorted({m[key] for m in models})}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
              "host": cp.host_identity(), "calibration": {"source": calibration.source, "fit": dict(calibration.fit)},
              "seed": args.seed, "rounds": args.rounds, "seconds": time.time() - started,
              "all": _score(errors), "groups": groups, "models": models}
    if previous:  # earlier runs stay on record
        report["history"] = [*previous.get("history", []), {
            "date": previous["date"], "seed": previous.get("seed"), "models": previous["all"]["n"],
            "fitted_on": previous["calibration"]["fit"].get("models"),
            "feature_set": previous["calibration"]["fit"].get("feature_set"), "within_10pct": previous["all"]["within_10pct"],
            "median_abs_error": previous["all"]["median_abs_error"]}]
    out_json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (HERE / "cpu_predictor_holdout.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report).split("\n\n")[2], file=sys.stderr)
    return 0


def rescore(path: Path, count: int) -> int:
    """Today's calibration against an earlier run's measurements: candidates are deterministic in
    their seed, so they are rebuilt instead of measured again."""
    earlier = json.loads(path.read_text(encoding="utf-8"))
    measured = {m["key"]: m for m in earlier["models"]}
    calibration = cp.load_calibration(threads=1)
    errors, models = [], []
    with tempfile.TemporaryDirectory(prefix="autocomp-holdout-") as tmp:
        for spec in cc.candidate_specs(count, earlier["seed"]):
            if spec.key in measured:
                m = measured[spec.key]
                predicted = cp.predict_latency_ms(cc.build_candidate(spec, Path(tmp)), {"input": spec.input_shape},
                                                  calibration)
                errors.append(predicted / m["measured_ms"] - 1)
                models.append(m)
    if len(models) != len(measured):
        print(f"found {len(models)} of the {len(measured)} candidates with --count {count}", file=sys.stderr)
    s = _score(errors)
    print(f"seed {earlier['seed']}, measured {earlier['date']}, calibration feature set "
          f"{calibration.fit.get('feature_set')}: {s['within_10pct']:.1%} of {s['n']} within 10 % "
          f"(median error {s['median_abs_error']:.1%})", file=sys.stderr)
    for key in ("precision", "family"):
        for value in sorted({m[key] for m in models}):
            g = _score([e for m, e in zip(models, errors) if m[key] == value])
            print(f"  {key} {value}: {g['within_10pct']:.1%} of {g['n']}", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    a = report["all"]
    fit = report["calibration"]["fit"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    lines = [
        "# `cpu` predictor on held-out candidates",
        "",
        f"Generated by `{report['command']}` on {report['date']} ({report['host']['cpu_model']}, "
        f"{report['host']['isa']}, ONNX Runtime {report['host']['onnxruntime']}, 1 thread; "
        f"{report['seconds'] / 60:.1f} min). {a['n']} candidates drawn with seed {report['seed']} (none of them "
        f"among the {fit.get('models', '?')} the shipped calibration was fitted on, measured {fit.get('date', '?')}), "
        f"each measured in {report['rounds']} interleaved rounds; latency = median over rounds of each measurement's "
        "fastest run. Predictions from the shipped calibration, unchanged.",
        "",
        f"**{pct(a['within_10pct'])} of predictions within 10 % of measured** (bar: 90 %); median error "
        f"{pct(a['median_abs_error'])}, 90th percentile {pct(a['p90_abs_error'])}, max {pct(a['max_abs_error'])}. "
        f"The same calibration's 5-fold cross-validation on its own candidates: "
        f"{pct(fit.get('cross_validated_within_10pct', float('nan')))} (`cpu_predictor.md`); the features were "
        "chosen on those candidates, so this figure is the fairer one.",
        "",
        "| subset | n | within 10 % | median error | p90 error | max error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in [("all", a), *report["groups"].items()]:
        lines.append(f"| {name} | {s['n']} | {pct(s['within_10pct'])} | {pct(s['median_abs_error'])} | "
                     f"{pct(s['p90_abs_error'])} | {pct(s['max_abs_error'])} |")
    if report.get("history"):
        lines += ["", "Earlier runs (each scored the calibration shipped then, on the candidates of its seed that "
                  "calibration was not fitted on; with one seed, a smaller --count draws the first of the same "
                  "candidates):", "",
                  "| date | seed | held-out candidates | calibration fitted on | feature set | within 10 % | median error |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {h['date']} | {h.get('seed', '?')} | {h['models']} | {h['fitted_on']} | {h.get('feature_set', '?')} | "
                  f"{pct(h['within_10pct'])} | "
                  f"{pct(h['median_abs_error'])} |" for h in report["history"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
