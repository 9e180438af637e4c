"""Score the shipped ``cpu`` predictor on candidates it was never fitted or designed on.

``benchmarks/cpu_predictor.py`` cross-validates the predictor on its candidates, but its
features were chosen by looking at those same candidates, so its figure is optimistic. This
benchmark builds a fresh set (:func:`autocomp_plugins.cpu_calibrate.candidate_specs` with another
seed; any candidate already in ``cpu_predictor.json`` is dropped), measures each with the cpu
target's harness (interleaved rounds, each measurement's fastest run, median over rounds), and
compares with the shipped calibration's predictions, unchanged. Run
``python benchmarks/cpu_predictor_holdout.py`` (about 6 minutes at the defaults); it writes
``cpu_predictor_holdout.json`` and ``cpu_predictor_holdout.md``. ``--rescore JSON`` scores today's
shipped calibration on the measurements an earlier run recorded, without measuring again; its
features are computed with the NCHWc block and L1d size of the host that measured them (given as
``--block N --l1d BYTES``, else recorded in that JSON, else in the calibration's fit).
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
from cpu_predictor import _score, recorded_feature_facts  # noqa: E402  (benchmarks/cpu_predictor.py)


def shipped_calibration() -> cp.CpuCalibration:
    """The calibration shipped with autocomp, for one thread: never a cached one of this host."""
    return next(c for c in cp.read_calibrations(cp.SHIPPED_CALIBRATION) if c.threads == 1)


def fitted_on() -> set[str]:
    """Keys of the candidates in ``cpu_predictor.json``: those the shipped calibration was fitted on."""
    return {m["key"] for m in json.loads((HERE / "cpu_predictor.json").read_text(encoding="utf-8"))["models"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="candidates to draw (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="candidate seed; cpu_predictor.py uses 0 (default 1)")
    parser.add_argument("--rescore", type=Path, metavar="JSON",
                        help="score the shipped calibration on the measurements of an earlier run's "
                             "cpu_predictor_holdout.json (its candidates are rebuilt; nothing is measured or written)")
    parser.add_argument("--block", type=int, metavar="N",
                        help="--rescore: NCHWc block of the host that measured (its cpu_predictor.nchwc_block())")
    parser.add_argument("--l1d", type=int, metavar="BYTES",
                        help="--rescore: L1 data cache of the host that measured (its cpu_predictor.l1d_bytes())")
    args = parser.parse_args(argv)
    if (args.block is None) != (args.l1d is None) or (args.block is not None and not args.rescore):
        parser.error(f"--block and --l1d must be given together and only with --rescore, but got --block "
                     f"{args.block} --l1d {args.l1d} --rescore {args.rescore}; give both with --rescore, or neither")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's notices
    if args.rescore:
        given = None if args.block is None else {"nchwc_block": args.block, "l1d_bytes": args.l1d}
        return rescore(args.rescore, args.count, given)

    out_json = HERE / "cpu_predictor_holdout.json"
    try:  # read first: a broken file must not cost a finished run
        previous = json.loads(out_json.read_text(encoding="utf-8")) if out_json.exists() else None
    except (OSError, ValueError) as exc:
        print(f"not keeping the earlier runs of {out_json.name}: {exc}", file=sys.stderr)
        previous = None
    fitted = fitted_on()
    calibration = shipped_calibration()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="autocomp-holdout-") as tmp:
        specs, paths = [], []
        for spec in cc.candidate_specs(args.count, args.seed):
            if spec.key in fitted:
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
    groups = _groups(models, errors)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
              "host": cp.host_identity(), **cp.host_feature_facts(),  # what the features were computed with
              "calibration": {"source": calibration.source, "fit": dict(calibration.fit)},
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


def rescore(path: Path, count: int, given: dict[str, int] | None = None) -> int:
    """The shipped calibration against an earlier run's measurements: candidates are deterministic in
    their seed, so they are rebuilt instead of measured again. Their features are computed with
    ``given`` (NCHWc block and L1d size), else those the run or the calibration recorded; with none,
    nothing is scored (exit status 2). Candidates the calibration was fitted on are dropped."""
    earlier = json.loads(path.read_text(encoding="utf-8"))
    calibration = shipped_calibration()
    facts, where = given, "given"
    if facts is None:
        facts, where = recorded_feature_facts(earlier), f"recorded in {path.name}"
    if facts is None:
        facts, where = recorded_feature_facts(calibration.fit), "recorded in the shipped calibration's fit"
    if facts is None:
        print(f"{path.name} was measured on {earlier.get('host', 'another host')}, but neither it nor the shipped "
              "calibration's fit records that host's NCHWc block and L1d size, which the features depend on; "
              "this host's may differ. Pass that host's values: --block N --l1d BYTES (what "
              "cpu_predictor.nchwc_block() and l1d_bytes() return there)", file=sys.stderr)
        return 2
    recorded = {m["key"]: m for m in earlier["models"]}
    fitted = fitted_on()
    measured = {k: m for k, m in recorded.items() if k not in fitted}
    if len(measured) != len(recorded):
        print(f"dropped {len(recorded) - len(measured)} of the {len(recorded)} candidates: the shipped calibration "
              "was fitted on them (cpu_predictor.json)", file=sys.stderr)
    errors, models = [], []
    with tempfile.TemporaryDirectory(prefix="autocomp-holdout-") as tmp:
        for spec in cc.candidate_specs(count, earlier["seed"]):
            if spec.key in measured:
                m = measured[spec.key]
                row = cp.graph_features(cc.build_candidate(spec, Path(tmp)), {"input": spec.input_shape},
                                        block=facts["nchwc_block"], l1d=facts["l1d_bytes"])
                errors.append(calibration.predict(row) / m["measured_ms"] - 1)
                models.append(m)
    if len(models) != len(measured):
        print(f"found {len(models)} of the {len(measured)} candidates with --count {count}", file=sys.stderr)
    if not models:
        why = (f"none of the {len(measured)} candidates left is among the first {count} of seed {earlier['seed']}; "
               "raise --count" if measured else "the shipped calibration was fitted on all of its candidates")
        print(f"nothing to score in {path.name}: {why}", file=sys.stderr)
        return 1
    s = _score(errors)
    print(f"seed {earlier['seed']}, measured {earlier['date']}, calibration feature set "
          f"{calibration.fit.get('feature_set')}, NCHWc block {facts['nchwc_block']} and L1d {facts['l1d_bytes']} "
          f"bytes ({where}): {s['within_10pct']:.1%} of {s['n']} within 10 % "
          f"(median error {s['median_abs_error']:.1%})", file=sys.stderr)
    for name, g in _groups(models, errors).items():
        print(f"  {name}: {g['within_10pct']:.1%} of {g['n']}", file=sys.stderr)
    return 0


def _groups(models: list[dict], errors: list[float]) -> dict[str, dict]:
    """The scores of each precision's and each family's candidates, keyed ``"precision int8"`` ..."""
    return {f"{key} {value}": _score([e for m, e in zip(models, errors) if m[key] == value])
            for key in ("precision", "family") for value in sorted({m[key] for m in models})}


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
