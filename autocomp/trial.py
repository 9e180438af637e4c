"""One trial of a search: sample, build, recover, export, score, time and record a candidate.

:class:`Objective` is what ``run_search`` hands to Optuna. For each trial it builds the structure,
rejects it before training when the target predicts it cannot meet ``--max-latency``, recovers
(fine-tunes), exports, applies the post-export methods, scores the artifact on the validation split
and times it, giving a reading that decides a place on the front a second window
(:meth:`Objective._recheck_reason`); the record goes to ``metrics.json`` and the study. After a
trained trial it adds the trial's siblings (:meth:`Objective._add_siblings`; ``proposals`` module).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from autocomp.errors import CandidateError
from autocomp.method import EVALUATION_ARTIFACT, CandidateContext
from autocomp.proposals import SEED_OF, SIBLING_OF, TOGGLE_ATTRS, MethodToggles, tried
from autocomp.results import copy_atomic, write_json
from autocomp.space import ConcreteSpace
from autocomp.workload import Workload

if TYPE_CHECKING:
    from autocomp.search import Prepared

__all__ = ["Objective", "evaluate", "metric_drop", "model_stats", "FILES_IN", "RECORD_ATTRS", "RECHECK_WITHIN", "Event"]

logger = logging.getLogger("autocomp")

#: User attribute of a trial whose files are not in its own trial directory (a sibling's are in its
#: source's): their directory, relative to the run directory.
FILES_IN = "files_in"
#: A trial's user attribute, in a study processes share (``autocomp worker``): the process that
#: ran it, host:pid.
WORKER = "worker"
#: The study's user attribute that tells every process to start no more trials: the search is
#: finishing (or was stopped) and writes the summary.
CLOSED = "closed"
#: The parts of a trial's record (``metrics.json``) kept in the study too, as user attributes.
RECORD_ATTRS = ("drop", "latency_p90_ms", "size_bytes", "feasible", "speedup")
#: A measured candidate whose first reading puts it on the front, or misses the front or
#: --max-latency by less than this factor, is measured once more and keeps the faster reading
#: (:meth:`Objective._recheck_reason`).
RECHECK_WITHIN = 1.5
Event = Callable[[str, Mapping[str, Any]], None]


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


def metric_drop(metric: float, base: float, relative: bool) -> float:
    """How far ``metric`` falls below the base model's ``base``: in points, or as a fraction of it."""
    drop = base - metric
    if relative:
        drop = drop / base if base else float("inf")
    return drop


def model_stats(model, example_input) -> dict[str, int]:
    """The torch model's MACs and parameters at ``example_input``."""
    from autocomp.candidate import count_macs

    macs, params = count_macs(model, example_input)
    return {"macs": macs, "params": params}


class Objective:
    """The Optuna objective of a search: one trial from sampled spec to scored record (module docs)."""

    def __init__(self, prep: Prepared, concrete: ConcreteSpace, baseline: dict[str, Any], on_event: Event,
                 stop: Any, toggles: MethodToggles, worker: str | None = None):
        self.stop = stop
        #: the process running the trials (host:pid), recorded on each when several share the study
        self.worker = worker
        self.prep = prep
        self.concrete = concrete
        self.baseline = baseline
        self.on_event = on_event
        #: the search's method toggles; a trial's siblings are their post-export ones
        #: (:meth:`MethodToggles.post_export`)
        self.toggles = toggles
        from autocomp.latency import LatencyCache

        self.cache = LatencyCache(prep.run.root / "latency_cache.sqlite")
        self.can_predict: bool | None = None  # found out on the first candidate checked against --max-latency

    def margin(self) -> float:
        """Slack on predictions of measured targets: a candidate is dropped only when clearly too slow.

        30 %: above the cpu predictor's 90th-percentile error in every run of
        benchmarks/cpu_predictor.md and on candidates it was not fitted on
        (benchmarks/cpu_predictor_holdout.md); a predicted target's prediction is its latency, no slack."""
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
        if (not self.prep.target.measured
                or metric_drop(metric, self.baseline["metric"], cfg.relative_drop) > cfg.max_drop):
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

        if self.stop.requested:  # a stop landed while Optuna readied this trial: it never starts
            trial.set_user_attr("failure_reason", "KeyboardInterrupt: stopped before it started")
            raise KeyboardInterrupt
        if self.worker is not None:
            trial.set_user_attr(WORKER, self.worker)
            if trial.study.user_attrs.get(CLOSED):  # closed between this process's check and this trial's start
                trial.set_user_attr("failure_reason", "KeyboardInterrupt: the search had closed the study; not run")
                trial.study.stop()
                raise CandidateError("the search had closed the study; not run")
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
                with self.stop.interruptible():  # a stop ends the candidate's work at once
                    model = build_structure(wl.model, spec, self.concrete, ctx)
                    predicted = self._predicted_latency(model, spec, ctx)
                    if predicted is not None and predicted > self.latency_bound():
                        self._reject(trial, predicted)
                    model = recover(model, spec, self.concrete, ctx)
                    stats = model_stats(model, wl.example_input)
                    fp32 = export_onnx(model, wl.example_input, work / "fp32.onnx")
                    parity = check_parity(model, fp32, wl.val.inputs[:32])
                    final = build_artifact(fp32, spec, self.concrete, ctx)
                    artifact, metric, latency = self._score(trial, final, trial_dir, ctx)
            except optuna.TrialPruned:
                raise
            except BaseException as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    # the event below reports it too: a front end that shows events can leave this record out
                    logger.warning("trial %d failed: %s", trial.number, reason, extra={"event": "trial_failed"})
                trial.set_user_attr("failure_reason", reason)
                write_json(trial_dir / "metrics.json", {"status": "failed", "reason": reason,
                                                        "skipped": ctx.skipped, "notes": ctx.notes})
                # stopped: cut short by a stop (is_interrupted), not a failure of the candidate
                self.on_event("trial_failed", {"number": trial.number, "reason": reason,
                                               "stopped": isinstance(exc, KeyboardInterrupt)})
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
                    with self.stop.interruptible():
                        self._add_siblings(trial, fp32, metrics, stats, parity, ctx.seed)
                except KeyboardInterrupt:  # a stop while building siblings: the trained trial stands
                    self.stop.requested = True  # and the search stops at its end (_StopOnSignal.after_trial)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return metric, metrics["latency_ms"]

    def _reject(self, trial, predicted: float) -> None:
        """Record ``trial`` as rejected before training, its predicted latency over the bound, and
        end it (optuna.TrialPruned)."""
        import optuna

        cfg = self.prep.config
        reason = (f"predicted latency {predicted:.3f} ms exceeds --max-latency {cfg.max_latency_ms} ms"
                  f" (with a {100 * self.margin():.0f} % margin); rejected before training")
        with self.stop.deferred():
            trial.set_user_attr("rejected", reason)
        write_json(self.prep.run.trial_dir(trial.number) / "metrics.json",
                   {"status": "rejected", "reason": reason, "predicted_latency_ms": predicted})
        self.on_event("trial_rejected", {"number": trial.number, "reason": reason})
        raise optuna.TrialPruned(reason)

    def _add_siblings(self, trial, fp32: Path, metrics: dict[str, Any], stats: dict[str, int], parity: float,
                      seed: int) -> None:
        """Add ``trial``'s siblings to the study: its trained model, exported once as ``fp32``, with
        each optional post-export method (quantization) left out, or put in with its anchor setting,
        scored and timed like any trial (``proposals`` module docs). A sibling the study already
        tried, one whose setting the sampler would have to complete, and quantization put into a
        candidate already over the accuracy budget (it only loses accuracy) are not built, nor the
        base model itself (quantization left out of quantization alone: the toggles never propose
        it); a sibling that fails is logged and dropped (its directory removed), the trial stands."""
        import optuna

        cfg, run = self.prep.config, self.prep.run
        for method, switched_on, params in self.toggles.post_export(trial.params):
            self.stop.check()  # a stop that landed while the previous sibling was added
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
            added = False
            try:
                # the structure is its source's: so are the structural and recovery methods' skips
                inherited = [s for s in metrics["skipped"] if s[0] not in self.toggles.post_export_methods]
                record = self._sibling(trial, fp32, spec, out_dir, seed, stats, parity, inherited)
                attrs = {SIBLING_OF: trial.number, TOGGLE_ATTRS[switched_on][1]: method,
                         SEED_OF: trial.user_attrs.get(SEED_OF, trial.number),
                         FILES_IN: out_dir.relative_to(run.root).as_posix(), "skipped": record["skipped"],
                         **{key: record[key] for key in RECORD_ATTRS}}
                values = [record["metric"], record["latency_ms"]]
                sibling = optuna.trial.create_trial(params=fixed.params, distributions=fixed.distributions, values=values,
                                                    user_attrs=attrs, constraints=self._constraints(record))
                with self.stop.deferred():  # a sibling is added whole or not at all
                    trial.study.add_trial(sibling)
                    added = True
            except BaseException as exc:
                if not added:
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
        drop = metric_drop(metric, self.baseline["metric"], cfg.relative_drop)
        ms = latency.value(cfg.latency_statistic)
        record = {
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
            "feasible": None,  # from the constraints, below
            "seconds": round(time.perf_counter() - started, 2),
            "skipped": ctx.skipped,
            "notes": ctx.notes,
            **stats,
        }
        record["feasible"] = all(v <= 0 for v in self._constraints(record).values())
        return record

    def _constraints(self, record: dict[str, Any]) -> dict[str, float]:
        """The Optuna constraints of a scored candidate's record (<= 0 feasible)."""
        cfg = self.prep.config
        constraints = {"max_drop": record["drop"] - cfg.max_drop}
        if cfg.max_latency_ms is not None:
            constraints["max_latency"] = record["latency_ms"] - cfg.max_latency_ms
        return constraints
