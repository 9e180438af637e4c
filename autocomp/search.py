"""The study: baseline, objectives, constraints, sampler, storage, and the Pareto set.

``run_search`` is the whole of ``autocomp search``: it validates every input before it creates
anything, measures the uncompressed model exactly as it measures candidates, runs the Optuna study
(metric up, latency down; ``drop <= max_drop`` and ``latency <= max_latency`` as constraints), and
writes the run directory. It never prints; progress goes to the ``on_event`` callback.

"Latency" is one statistic of each measurement, ``SearchConfig.latency_statistic``: the fastest
timed run by default, because on a shared machine it repeats within about 1 % where the p50 moves
by 20 % (``benchmarks/cpu_predictor.md``), and a sampler learning from noise learns little. Every
record keeps the p50 and p90 as well (``latency_p50_ms``, ``latency_p90_ms``); ``latency_ms`` is
the statistic the search used. Interference only ever slows a reading, sometimes for a whole timing
window, so the base model keeps the fastest of :data:`BASELINE_WINDOWS` windows and a candidate
whose reading puts it on the front, or near it, gets a second window (``_Objective._recheck_reason``).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

from autocomp.errors import (
    AutocompError,
    CandidateError,
    ConfigError,
    ExportError,
    InfrastructureError,
    Interrupted,
)
from autocomp.method import EVALUATION_ARTIFACT, BaseModelInfo, CandidateContext
from autocomp.plugins import Registry
from autocomp.proposals import (
    SEED_OF,
    SIBLING_OF,
    TOGGLE_ATTRS,
    MethodToggles,
    StrengthSteps,
    anchors,
    is_sibling,
    proposal_origin,
    tried,
)
from autocomp.results import RunDir, copy_atomic, read_json, sha256_of, write_json
from autocomp.space import ConcreteSpace, SearchSpace, default_space_path, load_space
from autocomp.target import STATISTICS
from autocomp.workload import Workload, resolve_workload

__all__ = ["SearchConfig", "SearchResult", "run_search", "prepare", "evaluate"]

logger = logging.getLogger("autocomp")

STUDY_NAME = "autocomp"
#: User attribute of a trial whose files are not in its own trial directory (a sibling's are in its
#: source's): their directory, relative to the run directory.
FILES_IN = "files_in"
#: The parts of a trial's record (``metrics.json``) kept in the study too, as user attributes.
RECORD_ATTRS = ("drop", "latency_p90_ms", "size_bytes", "feasible", "speedup")
#: A measured candidate whose first reading puts it on the front, or misses the front or
#: --max-latency by less than this factor, is measured once more and keeps the faster reading
#: (``_Objective._recheck_reason``).
RECHECK_WITHIN = 1.5
#: Timing windows of the base model, the fastest kept: every speedup is measured against it.
BASELINE_WINDOWS = 3
Event = Callable[[str, Mapping[str, Any]], None]


@dataclass(frozen=True)
class SearchConfig:
    """Everything ``autocomp search`` takes; defaults are the CLI's defaults."""

    workload: str = "digits"
    target: str = "cpu"
    target_options: Mapping[str, Any] = field(default_factory=dict)
    space: Path | None = None
    max_drop: float = 0.02
    relative_drop: bool = False
    max_latency_ms: float | None = None
    trials: int = 20
    timeout_s: float | None = None
    seed: int = 0
    out: Path | None = None
    storage: str | None = None
    resume: bool = False
    keep_all: bool = False
    final_rounds: int = 3
    latency_statistic: str = "min"
    #: score every trained candidate also with each optional post-export method (quantization)
    #: toggled, without training it again (``proposals`` module docs, "siblings")
    siblings: bool = True

    def __post_init__(self) -> None:
        if self.latency_statistic not in STATISTICS:
            raise ConfigError(f"--latency-statistic must be one of {', '.join(STATISTICS)}, "
                              f"got {self.latency_statistic!r}")
        if not (0 <= self.max_drop <= 1):
            raise ConfigError(f"--max-drop must lie in [0, 1] (a fraction: 0.02 is 2 points), got {self.max_drop}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise ConfigError(f"--max-latency must be > 0 ms, got {self.max_latency_ms}")
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout_s}")


@dataclass
class SearchResult:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return self.summary["pareto"]

    @property
    def exit_code(self) -> int:
        return 0 if self.pareto else 1


@dataclass
class Prepared:
    """Validated inputs: nothing on disk has been created yet."""

    config: SearchConfig
    target: Any
    space: SearchSpace
    workload: Workload
    run: RunDir


def _default_run_name(config: SearchConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workload = config.workload.replace(":", "-").replace("/", "-").replace(".", "-")
    return f"{workload}-{config.target}-{stamp}"


def resolve_target(registry: Registry, name: str, options: Mapping[str, Any]) -> Any:
    """The target ``name`` configured with ``options``. ``agent`` (a URL) with a device other than
    ``remote`` measures that device through its agent, keeping the device's precisions."""
    from autocomp.latency import MeasuredThroughAgent

    from autocomp.calibration import stored_calibration

    options = dict(options)
    target = registry.target(name)
    if not target.measured and "agent" not in options and not options:
        stored = stored_calibration(target.name)
        if stored is not None:
            logger.info("target %s: using the correction stored by `autocomp calibrate`", target.name)
            options = dict(stored["options"])
    if target.name != "remote" and "agent" in options:
        agent_options = {k: options.pop(k) for k in ("agent", "token_file") if k in options}
        remote = registry.target("remote").configure(agent_options)
        return MeasuredThroughAgent(target.configure(options), remote)
    return target.configure(options)


def prepare(config: SearchConfig, registry: Registry) -> Prepared:
    """Validate target, space, run directory and workload, in that order (cheapest first)."""
    target = resolve_target(registry, config.target, config.target_options)
    space_path = config.space or default_space_path()
    space = load_space(space_path, registry.methods)
    run = RunDir(config.out or Path("results") / _default_run_name(config))
    if run.root.exists() and any(run.root.iterdir()):
        if not config.resume:
            raise ConfigError(
                f"run directory {run.root} already exists; pass --resume to continue it or --out to start a new one"
            )
        if not run.exists():
            raise ConfigError(f"{run.root} exists but holds no run.json; it is not an autocomp run, choose another --out")
    elif config.resume:
        raise ConfigError(f"--resume given but {run.root} holds no run to resume")
    workload = resolve_workload(config.workload, {n: e.factory for n, e in registry.workloads.items()})
    return Prepared(config, target, space, workload, run)


def evaluate(onnx_path: Path, workload: Workload, split: str = "val") -> float:
    """The workload's metric of the ONNX file at ``onnx_path`` on one of its splits (``val``, or
    ``test`` when it has one), run through ONNX Runtime: how every trial and the base model are scored.
    Raises :class:`CandidateError` when the metric is NaN."""
    from autocomp.ort import run_batches

    data = getattr(workload, split)
    outputs = run_batches(onnx_path, data.inputs.numpy())
    value = float(workload.metric(outputs, data.targets.numpy()))
    if value != value:  # NaN
        raise CandidateError(f"the metric is NaN on the {split} split")
    return value


def _test_metrics(prep: Prepared, members: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """The metric of the base model and every Pareto member on the workload's held-out test split,
    when it has one: ``test_metric`` and ``test_drop``.

    The Pareto set is chosen on the validation split, so its validation metrics are the best of
    many noisy draws and flatter the members; the test split, never seen by the search, does not.
    A member whose artifact this host cannot run (fp16 kernels ONNX Runtime's CPU provider lacks)
    gets None."""
    wl = prep.workload
    if wl.test is None:
        return
    for record in (baseline, *members):
        try:
            record["test_metric"] = evaluate(Path(record["artifact"]), wl, "test")
        except Exception as exc:  # noqa: BLE001 - a report figure; the finished search must still be written
            logger.warning("no test metric for %s: %s", record["artifact"], exc)
            record["test_metric"] = None
    base = baseline["test_metric"]
    for member in members:
        member["test_drop"] = (None if member["test_metric"] is None or base is None
                               else _drop(member["test_metric"], base, prep.config.relative_drop))


def _drop(metric: float, base: float, relative: bool) -> float:
    """How far ``metric`` falls below the base model's ``base``: in points, or as a fraction of it."""
    drop = base - metric
    if relative:
        drop = drop / base if base else float("inf")
    return drop


def _model_stats(model, example_input) -> dict[str, int]:
    from autocomp.candidate import count_macs

    macs, params = count_macs(model, example_input)
    return {"macs": macs, "params": params}


def _measure_baseline(prep: Prepared) -> dict[str, Any]:
    from autocomp.export import check_parity, export_onnx
    from autocomp.ort import input_shapes_of

    wl = prep.workload
    path = export_onnx(wl.model, wl.example_input, prep.run.baseline_dir / "model.onnx")
    try:
        parity = check_parity(wl.model, path, wl.val.inputs[:32])
    except CandidateError as exc:
        raise ExportError(f"the exported base model does not run in ONNX Runtime: {exc}") from exc
    metric = evaluate(path, wl)
    windows = [prep.target.latency(path, input_shapes_of(wl.example_input))
               for _ in range(BASELINE_WINDOWS if prep.target.measured else 1)]
    latency = min(windows, key=lambda stats: stats.value(prep.config.latency_statistic))
    return {
        "latency_windows_ms": [stats.value(prep.config.latency_statistic) for stats in windows],
        "metric": metric,
        "latency": latency.to_dict(),
        "latency_ms": latency.value(prep.config.latency_statistic),
        "latency_statistic": prep.config.latency_statistic,
        "latency_p50_ms": latency.p50_ms,
        "latency_p90_ms": latency.p90_ms,
        "size_bytes": path.stat().st_size,
        "parity_max_abs": parity,
        "artifact": str(path),
        **_model_stats(wl.model, wl.example_input),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("autocomp", "torch", "torch-pruning", "optuna", "onnx", "onnxruntime", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


class _Objective:
    def __init__(self, prep: Prepared, concrete: ConcreteSpace, baseline: dict[str, Any], on_event: Event,
                 stop: "_StopOnSignal"):
        self.stop = stop
        self.prep = prep
        self.concrete = concrete
        self.baseline = baseline
        self.on_event = on_event
        from autocomp.latency import LatencyCache

        self.cache = LatencyCache(prep.run.root / "latency_cache.sqlite")
        self.can_predict: bool | None = None  # found out on the first candidate checked against --max-latency

    @cached_property
    def toggles(self) -> MethodToggles:
        """What a trial's siblings toggle (:meth:`MethodToggles.post_export`)."""
        return MethodToggles(self.concrete, self.prep.config.trials)

    def margin(self) -> float:
        """Slack on predictions of measured targets: a candidate is dropped only when clearly too slow.

        30 %: above the cpu predictor's 90th-percentile error in every run of
        benchmarks/cpu_predictor.md (17-28 %); a predicted target's prediction is its latency, no slack."""
        return 0.0 if not self.prep.target.measured else 0.30

    def latency_bound(self) -> float:
        return self.prep.config.max_latency_ms * (1 + self.margin())

    def _recheck_reason(self, trial, metric: float, ms: float) -> str | None:
        """Why a measured candidate's first reading deserves a second window, or None.

        A candidate within the accuracy budget is measured again, and keeps the faster reading,
        unless its reading misses by more than :data:`RECHECK_WITHIN` the speed it needs to join the
        feasible front so far (that of the fastest member at least as accurate, and at most
        ``--max-latency``): a reading that decides whether it joins the front, and one that says how
        fast a member is, are the fastest of two windows. Interference only slows a reading, and a
        slowed window keeps a fast model off the front, or puts it there looking slower than it is;
        the sampler, the proposals and the next candidates' comparisons then work from the wrong
        figure. Two runs with identical first 23 trials read 4 of them 1.25-1.44x slower in one run
        and parted from there (benchmarks/joint_vs_single.md)."""
        cfg = self.prep.config
        if not self.prep.target.measured or _drop(metric, self.baseline["metric"], cfg.relative_drop) > cfg.max_drop:
            return None
        needed = min((t.values[1] for t in trial.study.best_trials if t.values[0] >= metric), default=None)
        bound = cfg.max_latency_ms
        if bound is not None and (needed is None or bound < needed):
            limit, what = bound, f"--max-latency {bound:g} ms"
        elif needed is not None:
            limit, what = needed, f"{needed:.4g} ms to join the front"
        else:
            return f"read {ms:.4g} ms, the most accurate candidate yet"
        if ms <= limit:
            return f"read {ms:.4g} ms, within {what}"
        if ms <= RECHECK_WITHIN * limit:
            return f"read {ms:.4g} ms, missing {what}"
        return None

    def _predicted_latency(self, model, spec, ctx) -> float | None:
        """Latency the target predicts for this structure at the spec's precisions, before training.

        Only when --max-latency is set and the target can predict; weights do not change latency, so
        the untrained structure is exported and passed through the post-export methods."""
        from autocomp.candidate import build_artifact
        from autocomp.export import export_onnx
        from autocomp.ort import input_shapes_of

        cfg, wl = self.prep.config, self.prep.workload
        if cfg.max_latency_ms is None:
            return None
        probe_dir = ctx.work_dir / "probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        probe_ctx = CandidateContext(workload=wl, teacher=wl.model, target=self.prep.target, work_dir=probe_dir,
                                     seed=ctx.seed)
        fp32 = export_onnx(model, wl.example_input, probe_dir / "fp32.onnx")
        if self.can_predict is None:  # asked once per search: whether the target predicts at all
            self.can_predict = self.prep.target.predict_latency(fp32, input_shapes_of(wl.example_input)) is not None
        if not self.can_predict:
            return None
        artifact = build_artifact(fp32, spec, self.concrete, probe_ctx)
        predicted = self.prep.target.predict_latency(artifact, input_shapes_of(wl.example_input))
        ctx.notes["predicted_latency_ms"] = predicted
        return predicted

    def __call__(self, trial) -> tuple[float, float]:
        import optuna

        from autocomp.candidate import build_artifact, build_structure, recover
        from autocomp.export import check_parity, export_onnx
        from autocomp.ort import input_shapes_of

        self.stop.check()
        prep, cfg, wl = self.prep, self.prep.config, self.prep.workload
        trial_dir = prep.run.trial_dir(trial.number)
        work = trial_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        spec = self.concrete.sample(trial)
        write_json(trial_dir / "spec.json", spec.to_dict())
        # a variant of a front member (a toggle, a step) fine-tunes with its seed: the two differ only in the variation
        ctx = CandidateContext(workload=wl, teacher=wl.model, target=prep.target, work_dir=work,
                               seed=cfg.seed * 100_003 + trial.user_attrs.get(SEED_OF, trial.number))
        try:
            try:
                model = build_structure(wl.model, spec, self.concrete, ctx)
                predicted = self._predicted_latency(model, spec, ctx)
                if predicted is not None and predicted > self.latency_bound():
                    reason = (f"predicted latency {predicted:.3f} ms exceeds --max-latency {cfg.max_latency_ms} ms"
                              f" (with a {100 * self.margin():.0f} % margin); rejected before training")
                    trial.set_user_attr("rejected", reason)
                    write_json(trial_dir / "metrics.json", {"status": "rejected", "reason": reason,
                                                            "predicted_latency_ms": predicted})
                    self.on_event("trial_rejected", {"number": trial.number, "reason": reason})
                    raise optuna.TrialPruned(reason)
                model = recover(model, spec, self.concrete, ctx)
                stats = _model_stats(model, wl.example_input)
                fp32 = export_onnx(model, wl.example_input, work / "fp32.onnx")
                parity = check_parity(model, fp32, wl.val.inputs[:32])
                final = build_artifact(fp32, spec, self.concrete, ctx)
                artifact, metric, latency = self._score(trial, final, trial_dir, ctx)
            except optuna.TrialPruned:
                raise
            except BaseException as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    logger.warning("trial %d failed: %s", trial.number, reason)
                trial.set_user_attr("failure_reason", reason)
                write_json(trial_dir / "metrics.json", {"status": "failed", "reason": reason,
                                                        "skipped": ctx.skipped, "notes": ctx.notes})
                self.on_event("trial_failed", {"number": trial.number, "reason": reason})
                raise
            metrics = self._metrics(metric, latency, artifact, parity, started, ctx, stats)
            for key, value in self._constraints(metrics).items():
                trial.set_constraint(key, value)
            write_json(trial_dir / "metrics.json", metrics)
            for key in RECORD_ATTRS:
                trial.set_user_attr(key, metrics[key])
            trial.set_user_attr("skipped", ctx.skipped)
            self.on_event("trial_complete", {"number": trial.number, **metrics})
            if cfg.siblings:
                try:
                    self._add_siblings(trial, fp32, metrics, stats, parity, ctx.seed)
                except KeyboardInterrupt:  # a stop while building siblings: the trained trial stands
                    self.stop.requested = True  # and the search stops at its end (_StopOnSignal.after_trial)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return metric, metrics["latency_ms"]

    def _add_siblings(self, trial, fp32: Path, metrics: dict[str, Any], stats: dict[str, int], parity: float,
                      seed: int) -> None:
        """Add ``trial``'s siblings to the study: its trained model, exported once as ``fp32``, with
        each optional post-export method (quantization) left out, or put in with its anchor setting,
        scored and timed like any trial (``proposals`` module docs). A sibling the study already
        tried, one whose setting the sampler would have to complete, and quantization put into a
        candidate already over the accuracy budget (it only loses accuracy) are not built; a sibling
        that fails is logged and dropped (its directory removed), the trial stands."""
        import optuna

        cfg, run = self.prep.config, self.prep.run
        for method, switched_on, params in self.toggles.post_export(trial.params):
            if switched_on and metrics["drop"] > cfg.max_drop:
                continue
            if tried(self.concrete, trial.study.get_trials(deepcopy=False), params):
                continue
            fixed = optuna.trial.FixedTrial(params)
            try:
                spec = self.concrete.sample(fixed)
            except ValueError:  # a parameter the sampler would draw
                continue
            out_dir = run.trial_dir(trial.number) / f"sibling-{method}"
            what = f"{'with' if switched_on else 'without'} {method}"
            try:
                # the structure is its source's: so are the structural and recovery methods' skips
                inherited = [s for s in metrics["skipped"] if s[0] not in self.toggles.post_export_methods]
                record = self._sibling(trial, fp32, spec, out_dir, seed, stats, parity, inherited)
                attrs = {SIBLING_OF: trial.number, TOGGLE_ATTRS[switched_on][1]: method,
                         SEED_OF: trial.user_attrs.get(SEED_OF, trial.number),
                         FILES_IN: out_dir.relative_to(run.root).as_posix(), "skipped": record["skipped"],
                         **{key: record[key] for key in RECORD_ATTRS}}
                trial.study.add_trial(optuna.trial.create_trial(
                    params=fixed.params, distributions=fixed.distributions,
                    values=[record["metric"], record["latency_ms"]], user_attrs=attrs, constraints=self._constraints(record)))
            except BaseException as exc:
                shutil.rmtree(out_dir, ignore_errors=True)  # no trial holds it
                if not isinstance(exc, Exception):
                    raise
                logger.warning("trial %d %s (its sibling) failed: %s: %s", trial.number, what, type(exc).__name__, exc)
                continue
            logger.info("trial %d %s: built from its trained model", trial.number, what)
            self.on_event("sibling_complete", {"number": trial.number, "what": what, **record})

    def _sibling(self, trial, fp32: Path, spec, out_dir: Path, seed: int, stats: dict[str, int],
                 parity: float, skipped: list) -> dict[str, Any]:
        """Build, score and time one sibling of ``trial`` in ``out_dir``, its record starting with
        ``skipped``; its record, as a trial's."""
        from autocomp.candidate import build_artifact

        work = out_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        ctx = CandidateContext(workload=self.prep.workload, teacher=self.prep.workload.model,
                               target=self.prep.target, work_dir=work, seed=seed)
        ctx.skipped.extend(skipped)
        try:
            final = build_artifact(fp32, spec, self.concrete, ctx)
            artifact, metric, latency = self._score(trial, final, out_dir, ctx)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_json(out_dir / "spec.json", spec.to_dict())
        record = self._metrics(metric, latency, artifact, parity, started, ctx, stats)
        write_json(out_dir / "metrics.json", record)
        return record

    def _score(self, trial, final: Path, out_dir: Path, ctx: CandidateContext) -> tuple[Path, float, Any]:
        """Copy the built artifact ``final`` to ``out_dir``, score it on the validation split and
        time it (a second window when :meth:`_recheck_reason` asks for one): (artifact, metric,
        latency statistics)."""
        cfg, wl = self.prep.config, self.prep.workload
        from autocomp.ort import input_shapes_of

        artifact = out_dir / "model.onnx"
        copy_atomic(final, artifact)
        # A method may leave an evaluation twin: the same numerics in ops this host can run
        # (fp16 layers emulated in fp32 with fp16 rounding). The target still times the artifact.
        evaluation = ctx.notes.pop(EVALUATION_ARTIFACT, None)
        metric = evaluate(Path(evaluation) if evaluation else artifact, wl)
        if evaluation:
            ctx.notes["metric_from"] = "evaluation twin (fp16 rounding emulated)"
        shapes = input_shapes_of(wl.example_input)
        latency, cached = self.cache.latency(self.prep.target, artifact, shapes)
        ctx.notes["latency_cached"] = cached
        why = None if cached else self._recheck_reason(trial, metric, latency.value(cfg.latency_statistic))
        if why:
            ctx.notes["latency_rechecked"] = {"why": why, "first_ms": latency.value(cfg.latency_statistic)}
            try:
                latency, second = self.cache.recheck(self.prep.target, artifact, shapes, latency,
                                                     cfg.latency_statistic)
                ctx.notes["latency_rechecked"]["second_ms"] = second.value(cfg.latency_statistic)
            except Exception as exc:  # noqa: BLE001 - the first reading stands
                ctx.notes["latency_rechecked"]["failed"] = f"{type(exc).__name__}: {exc}"
        return artifact, metric, latency

    def _metrics(self, metric: float, latency, artifact: Path, parity: float, started: float,
                 ctx: CandidateContext, stats: dict[str, int]) -> dict[str, Any]:
        """A scored candidate's record (``metrics.json``)."""
        cfg = self.prep.config
        drop = _drop(metric, self.baseline["metric"], cfg.relative_drop)
        ms = latency.value(cfg.latency_statistic)
        return {
            "status": "complete",
            "metric": metric,
            "drop": drop,
            "latency_ms": ms,
            "latency_statistic": cfg.latency_statistic,
            "latency_p50_ms": latency.p50_ms,
            "latency_p90_ms": latency.p90_ms,
            "latency": latency.to_dict(),
            "speedup": self.baseline["latency_ms"] / ms if ms else None,
            "size_bytes": artifact.stat().st_size,
            "parity_max_abs": parity,
            "feasible": drop <= cfg.max_drop and (cfg.max_latency_ms is None or ms <= cfg.max_latency_ms),
            "seconds": round(time.perf_counter() - started, 2),
            "skipped": ctx.skipped,
            "notes": ctx.notes,
            **stats,
        }

    def _constraints(self, record: dict[str, Any]) -> dict[str, float]:
        """The Optuna constraints of a scored candidate's record (<= 0 feasible)."""
        cfg = self.prep.config
        constraints = {"max_drop": record["drop"] - cfg.max_drop}
        if cfg.max_latency_ms is not None:
            constraints["max_latency"] = record["latency_ms"] - cfg.max_latency_ms
        return constraints


class _StopOnSignal:
    """SIGTERM and SIGINT stop the search and leave it resumable.

    The handler raises KeyboardInterrupt so the running trial is closed at once (Optuna marks it
    failed) instead of being left RUNNING in the storage; one that lands while a trained trial's
    siblings are built keeps the trial and stops the search after it. A raise can be lost (one that
    lands in a finalizer during garbage collection is printed and dropped), so the request is also
    recorded and the search stops at the next trial boundary at the latest.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def after_trial(self, study, trial) -> None:  # an Optuna callback
        if self.requested:
            study.stop()

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def _storage_url(prep: Prepared) -> str:
    return prep.config.storage or f"sqlite:///{prep.run.study_db.resolve()}"


def _open_study(prep: Prepared):
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: a conditional space (a removed block's ratios are not sampled) is split into the
        # parameter sets that occur together, each modelled jointly, instead of falling back to
        # independent sampling for every parameter outside the intersection
        sampler = optuna.samplers.TPESampler(seed=prep.config.seed, multivariate=True, group=True, n_startup_trials=8)
    try:
        return optuna.create_study(storage=_storage_url(prep), study_name=STUDY_NAME, sampler=sampler,
                                   directions=["maximize", "minimize"], load_if_exists=True)
    except Exception as exc:
        raise InfrastructureError(f"cannot open the study storage {_storage_url(prep)!r}: {exc}") from exc


def _final_measurements(prep: Prepared, members: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Re-measure the baseline and every Pareto member side by side, interleaved, and keep the
    median of the rounds: speedups in the report compare like with like under the same load.

    ``final_latency_ms`` (and ``final_speedup``) is the search's statistic; ``final_latency_p50_ms``
    the median of the rounds' p50s, from the same measurements."""
    from statistics import median

    from autocomp.latency import interleaved
    from autocomp.ort import input_shapes_of

    if not prep.target.measured or prep.config.final_rounds < 1:
        return
    shapes = input_shapes_of(prep.workload.example_input)
    records = [baseline, *members]
    rounds = interleaved(records, lambda record: prep.target.latency(Path(record["artifact"]), shapes),
                         prep.config.final_rounds)
    for record, samples in zip(records, rounds):
        record["final_latency_ms"] = median(s.value(prep.config.latency_statistic) for s in samples)
        record["final_latency_p50_ms"] = median(s.p50_ms for s in samples)
    for member in members:
        member["final_speedup"] = baseline["final_latency_ms"] / member["final_latency_ms"]


def _files_of(run: RunDir, trial) -> Path:
    """The directory holding ``trial``'s spec, metrics and model: its trial directory, or for a
    sibling, the one inside its source's (:data:`FILES_IN`)."""
    return run.root / trial.user_attrs[FILES_IN] if FILES_IN in trial.user_attrs else run.trial_dir(trial.number)


def _summary(prep: Prepared, concrete: ConcreteSpace, study, baseline: dict[str, Any], status: str) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]  # not enqueued ones
    members = []
    # the sampler can draw the same setting twice (common with categorical parameters), or write it
    # another way (quantization on at fp32 is quantization off); the same candidate is listed once,
    # under its first trial, with the repeats in ``same_as``
    first: dict[str, dict[str, Any]] = {}
    for t in sorted(study.best_trials, key=lambda t: (t.values[1], t.number)):
        candidate = json.dumps([concrete.canonical(t.params), t.values[0]], sort_keys=True, default=str)
        if candidate in first:
            first[candidate].setdefault("same_as", []).append(t.number)
            continue
        files = _files_of(prep.run, t)
        artifact = files / "model.onnx"
        metrics = read_json(files / "metrics.json")
        members.append({
            "trial": t.number,
            "metric": t.values[0],
            "drop": metrics["drop"],
            "latency_ms": t.values[1],
            "latency_p50_ms": metrics["latency_p50_ms"],
            "latency_p90_ms": metrics["latency_p90_ms"],
            "speedup": baseline["latency_ms"] / t.values[1],
            "size_bytes": metrics["size_bytes"],
            "macs": metrics.get("macs"),
            "params": metrics.get("params"),
            "artifact": str(artifact),
            "sha256": sha256_of(artifact),
            "spec": read_json(files / "spec.json"),
            "skipped": metrics.get("skipped", []),
        })
        # proposed by the search: another member's setting with one method left out or put in, or a step
        # stronger or milder
        members[-1].update(proposal_origin(t.user_attrs))
        first[candidate] = members[-1]
    skipped: dict[str, int] = {}
    for t in trials:
        if is_sibling(t):  # counted once per trained model: a sibling lists its source's skips again
            continue
        for method, what, why in t.user_attrs.get("skipped", []):
            skipped[f"{method}: {what} ({why})"] = skipped.get(f"{method}: {what} ({why})", 0) + 1
    failures = [
        {"trial": t.number, "reason": t.user_attrs.get("failure_reason", "unknown")}
        for t in trials if t.state == TrialState.FAIL
    ]
    rejected = sum(t.state == TrialState.PRUNED for t in trials)
    return {
        "run_dir": str(prep.run.root),
        "status": status,
        "workload": prep.workload.name,
        "metric_name": prep.workload.metric_name,
        "target": {"name": prep.target.name, "measured": prep.target.measured},
        "constraints": {"max_drop": prep.config.max_drop, "relative_drop": prep.config.relative_drop,
                        "max_latency_ms": prep.config.max_latency_ms},
        "latency_statistic": prep.config.latency_statistic,
        "baseline": baseline,
        "pareto": members,
        "trials": {
            "total": sum(not is_sibling(t) for t in trials),
            "complete": sum(t.state == TrialState.COMPLETE and not is_sibling(t) for t in trials),
            "failed": len(failures),
            "rejected_before_training": rejected,
            "feasible": sum(bool(t.user_attrs.get("feasible")) for t in trials
                            if t.state == TrialState.COMPLETE and not is_sibling(t)),
            # built from a trial's trained model with quantization toggled; not in the counts above
            "siblings": sum(is_sibling(t) for t in trials),
            "siblings_feasible": sum(bool(t.user_attrs.get("feasible")) for t in trials if is_sibling(t)),
        },
        "failures": failures,
        "skipped": skipped,
    }


def run_search(config: SearchConfig, registry: Registry, on_event: Event | None = None) -> SearchResult:
    """Run (or resume) a search and return its summary. Raises :class:`ConfigError` (nothing written)
    for bad input, :class:`Interrupted` when stopped by a signal (the run can be resumed)."""
    import optuna
    from optuna.trial import TrialState

    on_event = on_event or (lambda kind, data: None)
    prep = prepare(config, registry)
    run = prep.run
    created = not run.root.exists() or not any(run.root.iterdir())
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        on_event("baseline_start", {"workload": prep.workload.name, "target": prep.target.name})
        if config.resume:
            baseline = read_json(run.root / "baseline" / "metrics.json")
            # runs from before --latency-statistic optimised the p50
            used = baseline.setdefault("latency_statistic", "p50")
            baseline.setdefault("latency_ms", baseline["latency_p50_ms"])
            if used != config.latency_statistic:
                raise ConfigError(
                    f"{run.root} was searched on the {used} latency and cannot be resumed on the "
                    f"{config.latency_statistic}: its trials would mix the two; pass --latency-statistic {used}"
                )
        else:
            baseline = _measure_baseline(prep)
            write_json(run.baseline_dir / "metrics.json", baseline)
        info = BaseModelInfo(prep.workload.model, prep.workload.example_input, Path(baseline["artifact"]), prep.target)
        concrete = prep.space.concrete(info)
    except BaseException:
        if created:  # leave no half-written run behind
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    on_event("baseline_done", {**baseline, "parameters": concrete.size()})

    manifest = {
        "command": sys.argv,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "space_file": prep.space.source,
        "space": prep.space.text,
        "parameters": concrete.rows(),
        "workload": {"name": prep.workload.name, "info": prep.workload.info},
        "target": {"name": prep.target.name, "measured": prep.target.measured,
                   "precisions": sorted(prep.target.precisions), "facts": prep.target.facts()},
        "versions": _versions(),
        "seed": config.seed,
        "storage": "study.db" if config.storage is None else "external",
        "started": datetime.now(timezone.utc).isoformat(),
        "status": "running",
    }
    if config.resume and run.exists():
        previous = run.read_manifest()
        manifest["started"] = previous.get("started", manifest["started"])
        manifest["resumed"] = previous.get("resumed", 0) + 1
    run.write_manifest(manifest)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(prep)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not is_sibling(t)]
    if not study.get_trials(deepcopy=False):
        for anchor in anchors(concrete):
            study.enqueue_trial(anchor, skip_if_exists=True)
    # trials left RUNNING by a process that died are closed so the count below is honest
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if config.storage is None:  # with a shared storage, heartbeats do this for live workers
            study.tell(t.number, state=TrialState.FAIL)
    proposals = [MethodToggles(concrete, config.trials), StrengthSteps(concrete, config.trials)]
    if config.resume:
        for kind in proposals:
            kind.requeue_interrupted(study)
    remaining = max(0, config.trials - len(done))
    on_event("search_start", {"trials": config.trials, "done": len(done), "remaining": remaining})
    stop = _StopOnSignal()
    objective = _Objective(prep, concrete, baseline, on_event, stop)
    status = "complete"
    try:
        with stop:
            if remaining:
                study.optimize(objective, n_trials=remaining, timeout=config.timeout_s, catch=(Exception,),
                               gc_after_trial=True, callbacks=[*proposals, stop.after_trial])
    except KeyboardInterrupt:
        stop.requested = True
    if stop.requested:
        status = "interrupted"

    summary = _summary(prep, concrete, study, baseline, status)
    if status == "complete":
        _final_measurements(prep, summary["pareto"], summary["baseline"])
        _test_metrics(prep, summary["pareto"], summary["baseline"])
        if not config.keep_all:
            keep = {m["trial"] for m in summary["pareto"]}
            for t in study.get_trials(deepcopy=False):
                if t.number not in keep:
                    (_files_of(run, t) / "model.onnx").unlink(missing_ok=True)
    write_json(run.pareto, summary)
    run.update_manifest(status=status, finished=datetime.now(timezone.utc).isoformat(),
                        pareto_size=len(summary["pareto"]))
    if status == "interrupted":
        raise Interrupted(
            f"search interrupted after {summary['trials']['total']} trials; results so far are in {run.root}. "
            f"Resume with: autocomp search --resume --out {run.root} (same options)"
        )
    return SearchResult(run.root, summary)
