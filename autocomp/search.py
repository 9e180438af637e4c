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
whose reading puts it on the front, or near it, gets a second window
(``autocomp.trial.Objective._recheck_reason``). One trial's work is :mod:`autocomp.trial`.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from autocomp.errors import (
    AutocompError,
    CandidateError,
    ConfigError,
    ExportError,
    InfrastructureError,
    Interrupted,
)
from autocomp.method import BaseModelInfo
from autocomp.plugins import Registry
from autocomp.proposals import (
    MethodToggles,
    StrengthSteps,
    anchors,
    is_interrupted,
    is_sibling,
    proposal_origin,
    requeue_interrupted_anchors,
)
from autocomp.results import RunDir, read_json, sha256_of, write_json
from autocomp.space import ConcreteSpace, SearchSpace, default_space_path, load_space
from autocomp.target import STATISTICS
from autocomp.trial import CLOSED, FILES_IN, WORKER, Event, Objective, evaluate, metric_drop, model_stats
from autocomp.workload import Workload, fingerprint, resolve_workload

__all__ = ["SearchConfig", "SearchResult", "run_search", "prepare", "evaluate"]

logger = logging.getLogger("autocomp")

STUDY_NAME = "autocomp"
#: Timing windows of the base model, the fastest kept: every speedup is measured against it.
BASELINE_WINDOWS = 3


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
    #: with --storage: seconds between the heartbeats of a running trial; a trial silent for twice
    #: as long (its process killed, its machine gone) is failed by the next process that looks
    heartbeat_s: float = 60.0

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
        if not self.heartbeat_s >= 1:
            raise ConfigError(f"--heartbeat must be >= 1 second, got {self.heartbeat_s}")


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
                               else metric_drop(member["test_metric"], base, prep.config.relative_drop))


def _check_same_workload(prep: Prepared, baseline: dict[str, Any]) -> None:
    """On resume: raise :class:`ConfigError` when the workload's validation split, or its model, is
    not the one the run's base model was measured with. Weights that differ bitwise (a model trained
    again on another host or thread count) pass when the model still agrees with the recorded
    export. Runs from before the digests were recorded are not checked."""
    from autocomp.export import check_parity

    recorded, now = baseline.get("workload_sha256") or {}, fingerprint(prep.workload)
    changed = [part for part in now if part in recorded and recorded[part] != now[part]]
    if "model" in changed:
        try:
            check_parity(prep.workload.model, Path(baseline["artifact"]), prep.workload.val.inputs[:256])
            logger.info("the workload's model differs bitwise from the one measured, but agrees with its export; "
                        "resuming")
            changed.remove("model")
        except (AutocompError, OSError) as exc:
            logger.info("the workload's model disagrees with the base model's export: %s", exc)
    if changed:
        raise ConfigError(
            f"{prep.run.root} was searched with another {' and '.join(changed)} of workload "
            f"{prep.workload.name!r}" + (" (its outputs differ from the measured base model's)" if "model" in changed
                                         else "") +
            ": resumed trials would compress or score against something other than what was measured. A workload "
            "must give the same model and validation data on every call (load saved weights, seed any random "
            "split); start a new run with --out")


def _measure_baseline(prep: Prepared) -> dict[str, Any]:
    from autocomp.export import check_parity, export_onnx
    from autocomp.ort import input_shapes_of

    wl = prep.workload
    digests = fingerprint(wl)  # before any work: it reads every weight
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
        "workload_sha256": digests,
        **model_stats(wl.model, wl.example_input),
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


#: The logger Optuna's trial loop reports a failed trial with.
_OPTUNA_TRIALS = "optuna.study._optimize"


class _StopOnSignal:
    """SIGTERM and SIGINT stop the search and leave it resumable.

    A stop is always recorded, and the search ends at the next trial boundary at the latest
    (:meth:`after_trial`, or :meth:`check` as a trial starts). Only while a trial builds, trains,
    scores or times a candidate (:meth:`interruptible`) does the handler also raise
    KeyboardInterrupt, so that long work ends at once and Optuna closes the trial as failed.
    Anywhere else it raises nothing: a raise inside Optuna's own bookkeeping (telling a trial its
    values, sampling, a callback) or a storage write could leave the trial RUNNING or escape as
    another error. Work inside an interruptible stretch that must not be cut in two (a storage
    write) runs under :meth:`deferred`; a stop that lands there is acted on at the next
    :meth:`check`. So is one whose raise lands in a finalizer, where Python drops it (and, while
    the block runs, does not report it as an error).
    """

    def __init__(self) -> None:
        self.requested = False
        self._armed = False
        self._previous: dict[int, Any] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter on Optuna's trial loop (:data:`_OPTUNA_TRIALS`), wherever its records go:
        after a stop it leaves out Optuna's report of a failed trial, with its traceback: a trial the
        stop cut short is no failure to show."""
        if not self.requested:
            return True
        message = record.getMessage()
        return not (message.startswith("Trial ") and " failed " in message)

    def __enter__(self) -> "_StopOnSignal":
        logging.getLogger(_OPTUNA_TRIALS).addFilter(self)  # the logger exists before Optuna is imported
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
            self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _unraisable(self, unraisable) -> None:
        # a raise that landed in a finalizer (garbage collection) is lost, and Python prints it as
        # an error; the stop it carried is recorded and acted on at the next check
        if not (self.requested and unraisable.exc_type is KeyboardInterrupt):
            self._unraisable_hook(unraisable)

    def _handle(self, signum, frame):
        self.requested = True
        if self._armed:
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch of a trial's work that a stop ends at once (KeyboardInterrupt)."""
        armed, self._armed = self._armed, True
        try:
            self.check()
            yield
        finally:
            self._armed = armed

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A stretch, inside an interruptible one, that a stop must not cut in two."""
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = armed

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def after_trial(self, study, trial) -> None:  # an Optuna callback
        if self.requested:
            study.stop()

    def __exit__(self, *exc):
        if self.requested:
            # A KeyboardInterrupt raised through code run by exec() from a string (a dataclass or
            # namedtuple defined during a lazy import, say) sets CPython's "unhandled Ctrl-C" flag
            # (up to 3.13; gh-128130 changed it), and `python -m ...` then ends by killing itself
            # with SIGINT instead of exiting with its status (3). Running any string clears the
            # flag: the interrupt was handled.
            exec("")
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if self._previous and sys.unraisablehook == self._unraisable:  # unless another replaced it since
            sys.unraisablehook = self._unraisable_hook
        logging.getLogger(_OPTUNA_TRIALS).removeFilter(self)
        return False


def _storage_url(prep: Prepared) -> str:
    return prep.config.storage or f"sqlite:///{prep.run.study_db.resolve()}"


def _storage(prep: Prepared):
    """The study's storage: the run's own SQLite file, or the one ``--storage`` names, with
    heartbeats, since other processes (``autocomp worker``) may share it."""
    import warnings

    import optuna

    if prep.config.storage is None:
        return _storage_url(prep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(prep.config.storage, heartbeat_interval=int(prep.config.heartbeat_s))
        except ImportError as exc:  # Optuna's, around SQLAlchemy's import of the URL's driver
            missing = getattr(exc.__cause__, "name", None)
            raise ConfigError(f"--storage {_safe_url(prep.config.storage)} needs a database driver that is not "
                              f"installed{f' ({missing})' if missing else ''}: for PostgreSQL, pip install "
                              "'autocomp[postgres]' and write the URL as postgresql+psycopg://USER@HOST/DB") from exc
        except Exception as exc:
            raise InfrastructureError(f"cannot open the study storage {_safe_url(prep.config.storage)}: {exc}") from exc


def _masked_argv(argv: list[str]) -> list[str]:
    """``argv`` with the password of a ``--storage`` URL masked (``_safe_url``)."""
    masked = list(argv)
    for i, arg in enumerate(masked):
        if arg.startswith("--storage="):
            masked[i] = "--storage=" + _safe_url(arg.split("=", 1)[1])
        elif arg == "--storage" and i + 1 < len(masked):
            masked[i + 1] = _safe_url(masked[i + 1])
    return masked


def _safe_url(url: str) -> str:
    """``url`` without its password, for messages and the manifest."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: say nothing of it
        return "(given with --storage)"


def _open_study(prep: Prepared, *, load_only: bool = False, sampler_seed: int | None = None):
    """The run's study, created on first use; with ``load_only`` (a worker), an existing one only.
    ``sampler_seed`` defaults to the search's seed."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: a conditional space (a removed block's ratios are not sampled) is split into the
        # parameter sets that occur together, each modelled jointly, instead of falling back to
        # independent sampling for every parameter outside the intersection
        sampler = optuna.samplers.TPESampler(seed=prep.config.seed if sampler_seed is None else sampler_seed,
                                             multivariate=True, group=True, n_startup_trials=8)
    storage = _storage(prep)
    where = _safe_url(prep.config.storage) if prep.config.storage else repr(_storage_url(prep))
    if load_only:
        try:
            return optuna.load_study(storage=storage, study_name=STUDY_NAME, sampler=sampler)
        except KeyError:
            raise ConfigError(f"the storage {where} holds no autocomp study: give the --storage the search was "
                              "started with") from None
        except Exception as exc:
            raise InfrastructureError(f"cannot open the study storage {where}: {exc}") from exc
    try:
        return optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler,
                                   directions=["maximize", "minimize"], load_if_exists=True)
    except Exception as exc:
        raise InfrastructureError(f"cannot open the study storage {where}: {exc}") from exc


#: The study's user attribute naming the run it belongs to (its ``run.json``'s start time): a
#: worker given another database, or one holding another run's study, refuses it.
RUN_STARTED = "run_started"
def _process_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _budget_used(study, trials: int) -> bool:
    """Whether the study's trials, finished (not counting siblings or trials a stop cut short) and
    running in any process, make up the budget ``trials``."""
    from optuna.trial import TrialState

    counted = [t for t in study.get_trials(deepcopy=False) if not is_sibling(t) and not is_interrupted(t)]
    return sum(t.state.is_finished() or t.state == TrialState.RUNNING for t in counted) >= trials


def optimize_shared(study, objective, trials: int, timeout: float | None = None, callbacks=()) -> None:
    """``study.optimize`` for a study other processes share, until all of them together have used
    the budget ``trials`` or the search has closed the study. A trial another process failed as
    stale while this one still ran it (its heartbeats were late: a paused machine) makes Optuna's
    tell raise; that trial is lost, not the process."""
    import time

    started = time.monotonic()
    while not _budget_used(study, trials) and not study.user_attrs.get(CLOSED):
        left = None if timeout is None else timeout - (time.monotonic() - started)
        if left is not None and left <= 0:
            return
        try:
            study.optimize(objective, n_trials=None, timeout=left, catch=(Exception,), gc_after_trial=True,
                           callbacks=[*callbacks, _SharedBudget(trials)])
            return
        except (ValueError, AssertionError) as exc:
            # Optuna's tell refuses the finished trial ("Cannot tell a FAIL trial"), and its logging,
            # in a finally, then replaces that with an AssertionError ("Should not reach.")
            if not (str(exc).startswith("Cannot tell a FAIL trial") or str(exc) == "Should not reach."):
                raise
            logger.warning("a trial of this process was failed by another as silent (late heartbeats); going on")


class _SharedBudget:
    """An Optuna callback for a study other processes share: stop starting trials once the budget is
    used by all of them together, or once the search has closed the study (:data:`CLOSED`)."""

    def __init__(self, trials: int):
        self.trials = trials

    def __call__(self, study, trial) -> None:
        if _budget_used(study, self.trials) or study.user_attrs.get(CLOSED):
            study.stop()


def _check_study_is_this_runs(study, prep: Prepared) -> None:
    """Refuse (:class:`ConfigError`) a ``--storage`` whose study belongs to another run: a new
    search needs a study no search ran (trials enqueued in it are fine), a resumed one its own (its
    ``run.json``'s start time)."""
    from optuna.trial import TrialState

    recorded = study.user_attrs.get(RUN_STARTED)
    where = _safe_url(prep.config.storage)
    if not prep.config.resume:  # trials enqueued beforehand, not yet run, are the user's to give
        if recorded is not None or any(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            raise ConfigError(f"the storage {where} already holds the study of another search"
                              f"{f' (started {recorded})' if recorded else ''}: give each search a database of its own, "
                              "or resume that one with --resume and its --out")
    elif recorded is not None and recorded != prep.run.read_manifest().get("started"):
        raise ConfigError(f"the storage {where} holds the study of another run (started {recorded}) than "
                          f"{prep.run.root}: give the --storage that run was started with")


def _await_others(study, stop: "_StopOnSignal", on_event: Event, heartbeat_s: float, poll_s: float = 1.0) -> None:
    """Wait until no trial of the study is running: those of workers, which the summary must see
    finished. A trial whose process died is failed by its missing heartbeats; one that never sent
    any (its process died before its first, or ran a version of autocomp without them: no
    :data:`WORKER` attribute) is failed once it has run four heartbeats' grace."""
    import contextlib
    import time
    import warnings

    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from datetime import datetime, timedelta

    reported = None
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        silent_since = datetime.now() - timedelta(seconds=8 * heartbeat_s)  # generous: clocks of other hosts
        running = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if WORKER not in t.user_attrs and t.datetime_start is not None and t.datetime_start < silent_since:
                with contextlib.suppress(ValueError, RuntimeError):  # it may have finished meanwhile
                    study.tell(t.number, state=TrialState.FAIL)
                continue
            running.append(t.number)
        if not running:
            return
        if running != reported:
            on_event("waiting_for_workers", {"trials": running})
            reported = running
        with stop.interruptible():
            time.sleep(poll_s)


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


#: The failure reason reported for a failed trial that recorded none: a resumed run found it
#: RUNNING, the process that ran it gone, or Optuna failed it (an invalid value).
UNRECORDED_FAILURE = ("no reason recorded: the process running it ended without closing it (killed, or crashed), "
                      "or its values were invalid")


def _summary(prep: Prepared, concrete: ConcreteSpace, study, baseline: dict[str, Any], status: str) -> dict[str, Any]:
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]  # not enqueued ones
    trials = [t for t in finished if not is_interrupted(t)]  # a trial a stop cut short is counted apart
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
            # what the methods did (channels kept, layers at each precision, recovery skipped ...)
            "notes": metrics.get("notes", {}),
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
        {"trial": t.number, "reason": t.user_attrs.get("failure_reason", UNRECORDED_FAILURE)}
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
            "interrupted": len(finished) - len(trials),  # cut short by a stop: not in the counts above
            "feasible": sum(bool(t.user_attrs.get("feasible")) for t in trials
                            if t.state == TrialState.COMPLETE and not is_sibling(t)),
            # built from a trial's trained model with quantization toggled; not in the counts above
            "siblings": sum(is_sibling(t) for t in trials),
            "siblings_feasible": sum(bool(t.user_attrs.get("feasible")) for t in trials if is_sibling(t)),
        },
        "failures": failures,
        "skipped": skipped,
    }


def _write_report(run: RunDir) -> None:
    """The run's ``report.html``; a figure for people, so a failure to write it is a warning."""
    from autocomp.report import write_report

    try:
        write_report(run.root)
    except Exception as exc:  # noqa: BLE001 - the search's results are written; `autocomp report` retries
        logger.warning("report.html not written (%s: %s); write it with `autocomp report %s`",
                       type(exc).__name__, exc, run.root)


def _baseline(prep: Prepared, on_event: Event) -> tuple[dict[str, Any], ConcreteSpace]:
    """The base model's record (measured, or read back on resume) and the space made concrete for it."""
    config, run = prep.config, prep.run
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
        _check_same_workload(prep, baseline)
    else:
        baseline = _measure_baseline(prep)
        write_json(run.baseline_dir / "metrics.json", baseline)
    info = BaseModelInfo(prep.workload.model, prep.workload.example_input, Path(baseline["artifact"]), prep.target)
    return baseline, prep.space.concrete(info)


def run_search(config: SearchConfig, registry: Registry, on_event: Event | None = None) -> SearchResult:
    """Run (or resume) a search and return its summary. Raises :class:`ConfigError` (nothing written)
    for bad input, :class:`Interrupted` when stopped by SIGTERM or SIGINT (the run can be resumed,
    or, stopped before its first trial, run again)."""
    with _StopOnSignal() as stop:
        return _run_search(config, registry, on_event or (lambda kind, data: None), stop)


def _run_search(config: SearchConfig, registry: Registry, on_event: Event, stop: _StopOnSignal) -> SearchResult:
    import optuna
    from optuna.trial import TrialState

    try:
        with stop.interruptible():  # preparing may train the built-in model on first use
            prep = prepare(config, registry)
    except KeyboardInterrupt:
        raise Interrupted("search interrupted while preparing its workload; nothing was written: "
                          "run the same command again") from None
    run = prep.run
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = None
    if config.storage is not None:  # before anything is written: it may be another run's
        study = _open_study(prep)
        _check_study_is_this_runs(study, prep)
    created = not run.root.exists() or not any(run.root.iterdir())
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        with stop.interruptible():
            baseline, concrete = _baseline(prep, on_event)
    except BaseException as exc:
        if created:  # leave no half-written run behind
            shutil.rmtree(run.root, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            then = ("nothing was kept: run the same command again" if created else
                    f"Resume with: autocomp search --resume --out {run.root} (same options)")
            raise Interrupted(f"search interrupted while measuring the base model; {then}") from None
        raise
    on_event("baseline_done", {**baseline, "parameters": concrete.size()})

    manifest = {
        "command": _masked_argv(sys.argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
                  | ({"storage": _safe_url(config.storage)} if config.storage else {}),  # no password on disk
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
    shared = config.storage is not None  # `autocomp worker` processes may run trials of it too
    if shared:  # before the manifest: a worker reads it, then checks the study is its run's
        study.set_user_attr(RUN_STARTED, manifest["started"])
        study.set_user_attr(CLOSED, False)
    run.write_manifest(manifest)
    if study is None:
        study = _open_study(prep)
    if not study.get_trials(deepcopy=False):
        for anchor in anchors(concrete):
            study.enqueue_trial(anchor, skip_if_exists=True)
    # trials left RUNNING by a process that died are closed so the count below is honest
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if config.storage is None:  # a shared storage's may belong to a live process: left as they are
            study.tell(t.number, state=TrialState.FAIL)  # a failed trial of the budget, its process gone
    # a trial a stop cut short does not use up the budget (is_interrupted)
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and not is_sibling(t) and not is_interrupted(t)]
    toggles = MethodToggles(concrete, config.trials)  # also what a trial's siblings toggle
    proposals = [toggles, StrengthSteps(concrete, config.trials)]
    if config.resume:
        requeue_interrupted_anchors(concrete, study)
        for kind in proposals:
            kind.requeue_interrupted(study)
    remaining = max(0, config.trials - len(done))
    on_event("search_start", {"trials": config.trials, "done": len(done), "remaining": remaining})
    objective = Objective(prep, concrete, baseline, on_event, stop, toggles, worker=_process_name() if shared else None)
    try:
        if shared:  # the budget is shared with the workers: counted from the study after each trial
            if not stop.requested and not _budget_used(study, config.trials):
                optimize_shared(study, objective, config.trials, timeout=config.timeout_s,
                                callbacks=[*proposals, stop.after_trial])
            study.set_user_attr(CLOSED, True)  # workers start no more trials (on a stop too: resume reopens it)
            if not stop.requested:
                _await_others(study, stop, on_event, config.heartbeat_s)
        elif remaining and not stop.requested:
            study.optimize(objective, n_trials=remaining, timeout=config.timeout_s, catch=(Exception,),
                           gc_after_trial=True, callbacks=[*proposals, stop.after_trial])
    except KeyboardInterrupt:
        stop.requested = True
    summary = _summary(prep, concrete, study, baseline, "interrupted" if stop.requested else "complete")
    if not stop.requested:
        measured = copy.deepcopy(summary)  # written only whole: a resumed run measures again
        try:
            with stop.interruptible():
                _final_measurements(prep, measured["pareto"], measured["baseline"])
                _test_metrics(prep, measured["pareto"], measured["baseline"])
            summary = measured
        except KeyboardInterrupt:
            summary["status"] = "interrupted"
    status = summary["status"]
    if status == "complete" and not config.keep_all:
        keep = {m["trial"] for m in summary["pareto"]}
        for t in study.get_trials(deepcopy=False):
            if t.number not in keep:
                (_files_of(run, t) / "model.onnx").unlink(missing_ok=True)
    write_json(run.pareto, summary)
    _write_report(run)
    run.update_manifest(status=status, finished=datetime.now(timezone.utc).isoformat(),
                        pareto_size=len(summary["pareto"]))
    if status == "interrupted":
        cut = summary["trials"]["interrupted"]
        raise Interrupted(
            f"search interrupted after {summary['trials']['total']} trials"
            f"{f' (and {cut} cut short by a stop, not counted)' if cut else ''}; results so far are in {run.root}. "
            f"Resume with: autocomp search --resume --out {run.root} (same options)", summary
        )
    return SearchResult(run.root, summary)
