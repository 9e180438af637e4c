"""Calibrate and validate the ``cpu`` target's latency predictor on this host.

Run ``python benchmarks/cpu_predictor.py`` (about 20 minutes on two shared cores at the defaults,
300 candidates x 3 rounds, plus 2 to build them the first time; ``--count`` and ``--rounds`` trade
time for noise). It

1. builds ``--count`` candidates like the ones a search produces
   (:func:`autocomp_plugins.cpu_calibrate.candidate_specs`: the digits ResNet at several widths and
   image sizes, resnet20, mobilenet_v2, a small ViT and mobilefacenet, randomly pruned per group
   with ``round_to = 8``, in fp32, fully int8 or partly int8), cached in ``benchmarks/.cache/``;
2. measures every one ``--rounds`` times with the cpu target's harness (``TimingPolicy()``: one
   thread, warm-up, at least 1 s), interleaved in a new random order each round, recording the load
   average and the share of a core the process got during each measurement; a model's latency is
   the median over rounds of each measurement's fastest run (the statistic the search optimises by
   default), with the median of the round p50s reported beside it;
3. reports repeatability: per model, the largest deviation of one round from the model's median;
4. validates the predictor by 5-fold cross-validation: every candidate is predicted by coefficients
   fitted on the other four fifths, never on itself; the same folds score a FLOPs-only baseline
   (latency proportional to MACs) and a leave-one-architecture-out split shows how the fit carries
   to a family it never saw;
5. fits on all candidates and writes the shipped calibration
   ``plugins/autocomp_plugins/cpu_calibration.json`` (``--no-write-calibration`` to keep it), then
   ``benchmarks/cpu_predictor.json`` (every measurement) and ``benchmarks/cpu_predictor.md``.

``--refit`` skips building and measuring and refits on the measurements in ``cpu_predictor.json``
(features are recomputed from the cached ONNX files, which must still be there, with the NCHWc
block and L1d size that file records; this host's, with a warning, where it records none). The
calibration it writes names the host that took the measurements, wherever the refit runs.

Exit status 0 when at least 90 % of cross-validated predictions are within 10 % of measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache" / "cpu_predictor"
OUT_JSON = HERE / "cpu_predictor.json"
OUT_MD = HERE / "cpu_predictor.md"

from autocomp_plugins import cpu_calibrate as cc  # noqa: E402
from autocomp_plugins import cpu_predictor as cp  # noqa: E402
from autocomp_plugins.quantize import needs_reduce_range  # noqa: E402

BAR_ERROR = 0.10
BAR_FRACTION = 0.90
REPEAT_BAR = 0.05
FOLDS = 5
#: The heading from which benchmarks/cpu_predictor.md is written by hand (kept on a re-run).
KEEP = "## The previous record"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _errors(predicted, measured) -> np.ndarray:
    return np.asarray(predicted) / np.asarray(measured) - 1.0


def _score(errors: np.ndarray) -> dict:
    a = np.abs(errors)
    return {"n": int(a.size), "within_10pct": float(np.mean(a <= BAR_ERROR)), "median_abs_error": float(np.median(a)),
            "p90_abs_error": float(np.percentile(a, 90)), "max_abs_error": float(a.max()),
            "mean_signed_error": float(np.mean(errors))}


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return [np.asarray(group) for group in cp.random_folds(n, k, seed)]


def _out_of_fold(rows: list[dict], y: np.ndarray, groups: list[np.ndarray], features=tuple(cp.FEATURES)) -> np.ndarray:
    """Predictions for each held-out group from coefficients fitted on all the others."""
    return np.asarray(cp.out_of_fold_ms(rows, list(y), groups, features))


def _flops_rows(rows: list[dict]) -> list[dict]:
    return [{"mmacs": sum(v for k, v in r.items() if k.endswith(".mmacs"))} for r in rows]


def build(count: int, seed: int) -> list[dict]:
    CACHE.mkdir(parents=True, exist_ok=True)
    models = []
    for n, spec in enumerate(cc.candidate_specs(count, seed)):
        try:
            path = cc.build_candidate(spec, CACHE)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is reported, not fatal
            _say(f"  skipped {spec.describe()}: {type(exc).__name__}: {exc}")
            continue
        models.append({"key": spec.key, "spec": spec.describe(), "family": spec.family, "precision": spec.precision,
                       "input_shape": list(spec.input_shape), "path": str(path.relative_to(REPO))})
        if n % 20 == 0:
            _say(f"  built {n + 1}/{count}")
    return models


def recorded_feature_facts(*sources: dict) -> dict[str, int] | None:
    """The NCHWc block and L1d size (``cp.HOST_FEATURE_FACTS``) from the first of ``sources`` (a run's
    report, a calibration's fit) that records both; None when none does."""
    for source in sources:
        if all(k in source for k in cp.HOST_FEATURE_FACTS):
            return {k: int(source[k]) for k in cp.HOST_FEATURE_FACTS}
    return None


def features(models: list[dict], facts: dict[str, int]) -> list[float]:
    """Fill each model's features, computed with ``facts`` (the measured host's NCHWc block and L1d
    size); return the time each took, in ms (the graph analysis is a prediction's whole cost: the
    dot product after it is negligible)."""
    took = []
    for m in models:
        start = time.perf_counter()
        m["features"] = cp.graph_features(REPO / m["path"], {"input": m["input_shape"]},
                                          block=facts["nchwc_block"], l1d=facts["l1d_bytes"])
        took.append(1e3 * (time.perf_counter() - start))
    return took


#: The statistic the search optimises by default and the predictor is fitted to (each measurement's
#: fastest run), and the p50 reported beside it: the key of each model's per-round values.
STATISTIC, OTHER = "min", "p50"
ROUND_KEY = {"min": "round_min_ms", "p50": "round_p50_ms"}


def _spread(rounds: list[float]) -> float:
    """Largest deviation of one round from the median of the rounds."""
    mid = statistics.median(rounds)
    return max(abs(r / mid - 1) for r in rounds)


def _repeatability(models: list[dict], key: str) -> dict:
    spread = np.array([_spread(m[key]) for m in models])
    return {"rounds": len(models[0][key]), "median_spread": float(np.median(spread)),
            "p90_spread": float(np.percentile(spread, 90)), "models_within_5pct": float(np.mean(spread <= REPEAT_BAR)),
            "note": f"spread = max over rounds of |round value / median of rounds - 1|, per model ({key})"}


def _agreement(models: list[dict], key: str) -> dict | None:
    """How well two independent measurements of the same model agree (each the median of half the
    rounds, odd vs even): no predictor can agree with the measurements much better than they agree
    with themselves."""
    if len(models[0][key]) < 2:
        return None
    half_a = np.array([statistics.median(m[key][0::2]) for m in models])
    half_b = np.array([statistics.median(m[key][1::2]) for m in models])
    return _score(_errors(half_a, half_b))


def analyse(models: list[dict], seed: int) -> dict:
    key = ROUND_KEY[STATISTIC]
    rows = [m["features"] for m in models]
    median = np.array([statistics.median(m[key]) for m in models])
    quietest = np.array([min(m[key]) for m in models])
    spread = np.array([_spread(m[key]) for m in models])
    folds = _folds(len(models), FOLDS, seed)
    families = sorted({m["family"] for m in models})
    by_family = [np.array([i for i, m in enumerate(models) if m["family"] == f]) for f in families]

    predicted = _out_of_fold(rows, median, folds)
    flops = _out_of_fold(_flops_rows(rows), median, folds, features=("mmacs",))
    family_out = _out_of_fold(rows, median, by_family)
    predicted_quiet = _out_of_fold(rows, quietest, folds)
    # the p50 of the same measurements: its spread between rounds and how well the predictor fits it
    other = np.array([statistics.median(m[ROUND_KEY[OTHER]]) for m in models])
    stable = spread <= REPEAT_BAR
    for i, m in enumerate(models):
        m[f"median_{STATISTIC}_ms"] = float(median[i])
        m[f"median_{OTHER}_ms"] = float(other[i])
        m["round_spread"] = float(spread[i])
        m["predicted_cv_ms"] = float(predicted[i])
        m["predicted_flops_cv_ms"] = float(flops[i])
        m["predicted_family_out_ms"] = float(family_out[i])

    shares = np.array([s for m in models for s in m["round_cpu_share"]])
    loads = np.array([s for m in models for s in m["round_load"]])
    rounds = len(models[0][key])
    per_round_load = [float(np.mean([m["round_load"][r] for m in models])) for r in range(rounds)]
    per_round_share = [float(np.mean([m["round_cpu_share"][r] for m in models])) for r in range(rounds)]

    # Each round on its own: is a round with a lower load average a cleaner reference?
    per_round = []
    for r in range(rounds):
        y = np.array([m[key][r] for m in models])
        per_round.append({"round": r + 1, "load_1min_mean": per_round_load[r], "cpu_share_mean": per_round_share[r],
                          "over_quietest_median": float(np.median(y / quietest)),
                          **_score(_errors(_out_of_fold(rows, y, folds), y))})

    return {
        "statistic": STATISTIC,
        "per_round": per_round,
        "repeatability": _repeatability(models, key),
        "other_statistic": {
            "statistic": OTHER,
            "repeatability": _repeatability(models, ROUND_KEY[OTHER]),
            "predictor": _score(_errors(_out_of_fold(rows, other, folds), other)),
            "flops_only": _score(_errors(_out_of_fold(_flops_rows(rows), other, folds, features=("mmacs",)), other)),
            "measurement_vs_measurement": _agreement(models, ROUND_KEY[OTHER]),
            "note": f"the same measurements' {OTHER} instead of their fastest run; model latency = median over rounds",
        },
        "load": {
            "load_1min_mean": float(loads.mean()), "load_1min_min": float(loads.min()),
            "load_1min_max": float(loads.max()), "per_round_load_1min": per_round_load,
            "cpu_share_mean": float(shares.mean()), "per_round_cpu_share": per_round_share,
            "measurements_with_cpu_share_ge_0.97": float(np.mean(shares >= 0.97)),
            "note": "cpu share = process CPU time / wall time while measuring one model",
        },
        "validation": {
            "method": f"{FOLDS}-fold cross-validation (random folds, seed {seed}); each prediction from a fit without it",
            "predictor": _score(_errors(predicted, median)),
            "flops_only": _score(_errors(flops, median)),
            "leave_one_architecture_out": _score(_errors(family_out, median)),
            "stable_models_only": _score(_errors(predicted[stable], median[stable])) if stable.any() else None,
            "quietest_round_target": _score(_errors(predicted_quiet, quietest)),
            "measurement_vs_measurement": _agreement(models, key),
            "by_precision": {p: _score(_errors(predicted[idx], median[idx]))
                             for p in ("fp32", "int8", "mixed")
                             if (idx := np.array([i for i, m in enumerate(models) if m["precision"] == p])).size},
            "by_architecture": {f: _score(_errors(predicted[idx], median[idx])) for f, idx in zip(families, by_family)},
        },
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def markdown(report: dict) -> str:
    v, r, load, cal = report["validation"], report["repeatability"], report["load"], report["calibration"]
    o = report["other_statistic"]
    p = v["predictor"]
    lines = [
        "# `cpu` latency predictor: predicted vs measured on this host",
        "",
        f"Measured by `python benchmarks/cpu_predictor.py` on {report['date']}: {report['host']['cpu_model']} "
        f"({report['host']['isa']}), ONNX Runtime {report['host']['onnxruntime']}, {report['threads']} thread, "
        f"{report['cpu_count']} logical CPUs (a VM; its host is shared with other tenants). {p['n']} candidates, each measured "
        f"{r['rounds']} times with the cpu target's harness (`TimingPolicy()`: 1 thread, >= 1 s), interleaved; "
        "a model's latency is the median over rounds of each measurement's fastest run (the statistic "
        "`autocomp search` optimises by default); the p50 of the same measurements is reported beside it. Took "
        f"{report['seconds'] / 60:.1f} min.",
        "",
        "## Result",
        "",
        f"- **Predictor, {v['method']}: {_pct(p['within_10pct'])} of predictions within 10 % of measured** "
        f"(bar: 90 %); median error {_pct(p['median_abs_error'])}, 90th percentile {_pct(p['p90_abs_error'])}, "
        f"max {_pct(p['max_abs_error'])}.",
        f"- FLOPs-only baseline (latency proportional to MACs, same folds): {_pct(v['flops_only']['within_10pct'])} "
        f"within 10 %, median error {_pct(v['flops_only']['median_abs_error'])}.",
        f"- **Repeatability: the median model's rounds (fastest run) deviate from its median by up to "
        f"{_pct(r['median_spread'])}** (90th percentile {_pct(r['p90_spread'])}; "
        f"{_pct(r['models_within_5pct'])} of models within 5 %; bar: 5 %).",
        f"- **Load while measuring**: 1-minute load average {load['load_1min_mean']:.2f} on average "
        f"(min {load['load_1min_min']:.2f}, max {load['load_1min_max']:.2f}) on {report['cpu_count']} CPUs; this process "
        f"got {_pct(load['cpu_share_mean'])} of its core on average, and a full core (>= 97 %) in "
        f"{_pct(load['measurements_with_cpu_share_ge_0.97'])} of the measurements, so the slow rounds come from "
        "sharing the machine (caches, memory, the hypervisor), not from losing the core.",
        f"- **The p50 instead of the fastest run** (same measurements): the median model's round p50s deviate "
        f"from their median by up to {_pct(o['repeatability']['median_spread'])} (90th percentile "
        f"{_pct(o['repeatability']['p90_spread'])}; {_pct(o['repeatability']['models_within_5pct'])} of models "
        f"within 5 %); the predictor fitted to it: {_pct(o['predictor']['within_10pct'])} within 10 %.",
        "",
        "| subset / target | n | within 10 % | median error | p90 error | max error |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(name, s):
        if s:
            lines.append(f"| {name} | {s['n']} | {_pct(s['within_10pct'])} | {_pct(s['median_abs_error'])} | "
                         f"{_pct(s['p90_abs_error'])} | {_pct(s['max_abs_error'])} |")

    row("predictor, all candidates (median of rounds)", p)
    row("FLOPs-only baseline", v["flops_only"])
    row("predictor, leave one architecture out", v["leave_one_architecture_out"])
    row("predictor, models whose rounds agree within 5 %", v["stable_models_only"])
    row("predictor fitted and scored on the quietest round of each model", v["quietest_round_target"])
    row("measurement vs measurement: median of odd rounds vs even rounds (no predictor)", v["measurement_vs_measurement"])
    row("predictor fitted and scored on the p50 (median of rounds)", o["predictor"])
    row("FLOPs-only baseline on the p50", o["flops_only"])
    row("p50, measurement vs measurement (odd vs even rounds)", o["measurement_vs_measurement"])
    for name, s in v["by_precision"].items():
        row(f"predictor, {name} candidates", s)
    for name, s in v["by_architecture"].items():
        row(f"predictor, {name} candidates", s)
    lines += [
        "",
        "Each round on its own (predictor fitted and scored, by the same folds, on that round's fastest runs):",
        "",
        "| round | mean 1-min load | core share | round / quietest round (median) | within 10 % | median error |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for pr in report["per_round"]:
        lines.append(f"| {pr['round']} | {pr['load_1min_mean']:.2f} | {_pct(pr['cpu_share_mean'])} | "
                     f"{pr['over_quietest_median']:.3f} | {_pct(pr['within_10pct'])} | {_pct(pr['median_abs_error'])} |")
    if report.get("history"):
        lines += ["", "Earlier full runs of this benchmark (same method; the machine's load differed; until "
                  "2026-11-24 04:07 a model's latency was its p50):", "",
                  "| date | statistic | models x rounds | mean load | within 10 % | median error | "
                  "quietest round within 10 % | measurement vs measurement | median spread |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for h in report["history"]:
            mm = h["measurement_vs_measurement_within_10pct"]
            lines.append(f"| {h['date']} | {h.get('statistic', 'p50')} | {h['models']} x {h['rounds']} | "
                         f"{h['load_1min_mean']:.2f} | "
                         f"{_pct(h['within_10pct'])} | {_pct(h['median_abs_error'])} | "
                         f"{_pct(h['quietest_round_within_10pct'])} | {_pct(mm) if mm is not None else '-'} | "
                         f"{_pct(h['median_spread'])} |")
    lines += [
        "",
        "## Reading these figures",
        "",
        report["verdict"],
        "",
        "## The model and its shipped coefficients",
        "",
        "`latency_ms = sum(coefficient * feature)`, non-negative coefficients fitted on relative error "
        f"(all {cal['fit']['models']} candidates; in-sample {_pct(cal['fit']['in_sample_within_10pct'])} within 10 %). "
        "Features come from the edge cost model's per-node analysis "
        "(`autocomp_plugins.cpu_predictor.FEATURES`). A zero means the data did not need the term.",
        "",
        "| feature | coefficient | unit | what it counts |",
        "|---|---:|---|---|",
    ]
    for name, value in cal["coefficients"].items():
        unit = ("ms per million" if ".mmacs" in name or "melems" in name else "ms each")
        lines.append(f"| `{name}` | {value:.5g} | {unit} | {cp.FEATURES[name]} |")
    t = report["prediction_ms"]
    lines += [
        "",
        f"Prediction cost (graph analysis, this host): median {t['median']:.1f} ms, "
        f"max {t['max']:.1f} ms over the candidates (the largest graphs have about 400 nodes).",
        "",
        "## Caveats",
        "",
        "- The shipped coefficients are for this host, one thread, this ONNX Runtime; another host gets a warning and "
        "these numbers until it runs `autocomp calibrate --target cpu`.",
        "- Candidates are untrained; batch-norm statistics and per-layer constants are randomised so the export does "
        "not share initializers between layers (which would stop ONNX Runtime's int8 fusion), as in a trained model.",
        "- int8 is ONNX Runtime's QDQ format as the quantize method writes it (u8 activations, s8 per-channel weights, "
        f"the ops between int8 layers in int8 too; reduce_range {report['reduce_range']}); which Q/DQ nodes survive "
        "fusion follows ONNX Runtime's rules as modelled in `_qdq_kernels`, not its optimised graph.",
        f"- fp32 convolutions are priced at the channel counts ONNX Runtime's NCHWc layout computes: blocks of "
        f"{report['nchwc_block']} channels on this CPU (asked of ONNX Runtime: `cpu_predictor.nchwc_block()`); int8 "
        f"convolutions at their output channels rounded up to {cp.INT8_CHANNEL_BLOCK}, the block MLAS's symmetric "
        "int8 kernels pack filters in (`FilterOutputChannelPackCount` in onnxruntime's `mlas/lib/convsym.cpp`; a "
        "constant, `cpu_predictor.INT8_CHANNEL_BLOCK`, not asked of ONNX Runtime), which also fitted this host's "
        "measurements best.",
        "- Measurements on a VM whose host is shared with other tenants: see the load figures; the predictor cannot be more "
        "accurate than the measurements it is scored against.",
    ]
    previous = OUT_MD.read_text(encoding="utf-8") if OUT_MD.exists() else ""
    if KEEP in previous:
        lines += ["", previous[previous.index(KEEP):].rstrip("\n")]
    return "\n".join(lines) + "\n"


def _headline(report: dict) -> dict:
    v = report["validation"]
    return {"date": report["date"], "statistic": report.get("statistic", "p50"),
            "models": v["predictor"]["n"], "rounds": report["repeatability"]["rounds"],
            "load_1min_mean": report["load"]["load_1min_mean"],
            "within_10pct": v["predictor"]["within_10pct"], "median_abs_error": v["predictor"]["median_abs_error"],
            "flops_within_10pct": v["flops_only"]["within_10pct"],
            "quietest_round_within_10pct": v["quietest_round_target"]["within_10pct"],
            "measurement_vs_measurement_within_10pct": (v["measurement_vs_measurement"] or {}).get("within_10pct"),
            "median_spread": report["repeatability"]["median_spread"]}


def verdict(report: dict) -> str:
    v, r = report["validation"], report["repeatability"]
    met = v["predictor"]["within_10pct"] >= BAR_FRACTION
    repeat_met = r["median_spread"] <= REPEAT_BAR
    parts = []
    if met:
        parts.append(f"The accuracy bar is met: {_pct(v['predictor']['within_10pct'])} of held-out predictions are "
                     "within 10 % of the median measured latency.")
    else:
        parts.append(f"**The accuracy bar (90 % within 10 %) is not met on all candidates: "
                     f"{_pct(v['predictor']['within_10pct'])}.**")
    if repeat_met:
        o = report["other_statistic"]
        parts.append(f"Measurements repeat within the 5 % bar: the median model's fastest run moves by "
                     f"{_pct(r['median_spread'])} between rounds (90th percentile {_pct(r['p90_spread'])}), where "
                     f"its p50 moves by {_pct(o['repeatability']['median_spread'])}.")
    else:
        parts.append(f"**Measurements do not repeat within 5 % on this machine** (median spread "
                     f"{_pct(r['median_spread'])}, 90th percentile {_pct(r['p90_spread'])}): the reference the "
                     "predictor is scored against moves by about as much as the 10 % tolerance, so part of the error "
                     "above is measurement noise, not model error.")
    quiet = [(name, v[key]) for name, key in (("models whose rounds agree within 5 %", "stable_models_only"),
                                              ("the quietest round of each model", "quietest_round_target")) if v[key]]
    if v["measurement_vs_measurement"]:
        parts.append(f"Two independent measurements of the same model (median of the odd rounds against the "
                     f"median of the even rounds) agree within 10 % for "
                     f"{_pct(v['measurement_vs_measurement']['within_10pct'])} of the models: roughly the most any "
                     "predictor can score against these measurements.")
    if quiet:
        parts.append("On quieter data: " + "; ".join(f"{name}: {_pct(s['within_10pct'])} within 10 % (n={s['n']})"
                                                     for name, s in quiet) + ".")
    parts.append(f"FLOPs alone: {_pct(v['flops_only']['within_10pct'])} within 10 %. Leave one architecture out: "
                 f"{_pct(v['leave_one_architecture_out']['within_10pct'])} within 10 % (an architecture family the "
                 "fit never saw).")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="candidates to build and measure (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit", action="store_true", help="reuse the measurements in cpu_predictor.json")
    parser.add_argument("--no-write-calibration", action="store_true",
                        help="do not overwrite plugins/autocomp_plugins/cpu_calibration.json")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's notices about bias initializers

    started = time.time()
    threads = 1
    previous = json.loads(OUT_JSON.read_text(encoding="utf-8")) if OUT_JSON.exists() else {}
    history = list(previous.get("history", []))
    if previous and not args.refit and "validation" in previous:
        history.append(_headline(previous))  # every full run stays on record, not only the last
    if args.refit:
        models = previous["models"]
        measured_at = previous["date"]
        seconds = previous["seconds"]
    else:
        _say(f"building {args.count} candidates in {CACHE.relative_to(REPO)} ...")
        models = build(args.count, args.seed)
        _say(f"measuring {len(models)} candidates x {args.rounds} rounds (about "
             f"{len(models) * args.rounds * 1.3 / 60:.0f} min) ...")
        results = cc.measure_candidates([REPO / m["path"] for m in models],
                                        [{"input": m["input_shape"]} for m in models],
                                        threads=threads, rounds=args.rounds, seed=args.seed, progress=_say)
        for m, r in zip(models, results):
            m.update(round_p50_ms=r["round_p50_ms"], round_min_ms=r["round_min_ms"], round_load=r["round_load"],
                     round_cpu_share=r["round_cpu_share"])
        measured_at = time.strftime("%Y-%m-%d %H:%M")
        seconds = None
    facts = cp.host_feature_facts()  # measured here
    if args.refit:
        recorded = recorded_feature_facts(previous, previous.get("calibration", {}).get("fit", {}))
        if recorded is None and previous.get("host") != cp.host_identity():
            _say(f"warning: {OUT_JSON.name} records no NCHWc block and L1d size and was measured on another host "
                 f"({previous.get('host')}); computing its features with this host's ({facts})")
        facts = recorded or facts
    took = features(models, facts)
    report = analyse(models, args.seed)

    rows = [m["features"] for m in models]
    median = [m[f"median_{STATISTIC}_ms"] for m in models]
    coefficients = cp.fit_coefficients(rows, median)
    # the host the measurements were taken on: a refit elsewhere must not pass them off as this host's
    # (load_calibration would then take the calibration for one fitted here)
    host = previous.get("host", cp.host_identity()) if args.refit else cp.host_identity()
    in_sample = np.abs(_errors([cp.CpuCalibration(host, threads, coefficients).predict(r) for r in rows], median))
    calibration = cp.CpuCalibration(host=host, threads=threads, coefficients=coefficients, fit={
        "models": len(models),
        "rounds": report["repeatability"]["rounds"],
        "target": cp.FIT_TARGET,
        "feature_set": cp.FEATURE_SET,
        **facts,  # what the features were computed with
        "in_sample_within_10pct": float(np.mean(in_sample <= BAR_ERROR)),
        "in_sample_median_error": float(np.median(in_sample)),
        "cross_validated_within_10pct": report["validation"]["predictor"]["within_10pct"],
        "cross_validated_median_error": report["validation"]["predictor"]["median_abs_error"],
        "load_1min_mean": report["load"]["load_1min_mean"],
        "date": measured_at,
        "by": "benchmarks/cpu_predictor.py",
    })
    if not args.no_write_calibration:
        cp.write_calibrations(cp.SHIPPED_CALIBRATION, [calibration])
        _say(f"wrote {cp.SHIPPED_CALIBRATION.relative_to(REPO)}")

    report.update(
        date=measured_at, host=host, threads=threads, cpu_count=previous.get("cpu_count") if args.refit else os.cpu_count(),
        seconds=seconds if seconds is not None else time.time() - started,
        calibration=calibration.to_dict(),
        prediction_ms={"median": float(np.median(took)), "max": float(np.max(took))},
        **facts,
        reduce_range=(previous.get("reduce_range") if args.refit
                      else "on (this CPU has no VNNI)" if needs_reduce_range() else "off (this CPU has VNNI)"),
    )
    report["verdict"] = verdict(report)
    report["history"] = history
    OUT_JSON.write_text(json.dumps({**report, "models": models}, indent=1) + "\n", encoding="utf-8")
    OUT_MD.write_text(markdown(report), encoding="utf-8")
    _say(f"wrote {OUT_JSON.relative_to(REPO)} and {OUT_MD.relative_to(REPO)}")
    _say(report["verdict"])
    return 0 if report["validation"]["predictor"]["within_10pct"] >= BAR_FRACTION else 1


if __name__ == "__main__":
    sys.exit(main())
