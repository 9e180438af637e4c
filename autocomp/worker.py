"""``autocomp worker``: run trials of a search started elsewhere, sharing its study.

A search started with ``--storage postgresql://...`` keeps its Optuna study in that database. A
worker, on this machine or another, reads the search's run directory (its ``run.json`` and base
model record, on a file system both reach), loads the same workload, target and space, checks it
got the same model and data (:func:`autocomp.search._check_same_workload`), and runs trials of the
same study into the same run directory until the trials of every process together make up the
budget, or the search closes the study. Optuna's storage hands each enqueued trial to one process;
heartbeats fail the trial of a process that died (:data:`autocomp.search.SearchConfig.heartbeat_s`),
and a failed trial is not retried: a candidate that kills its process would kill every worker.
The search itself writes the summary once no trial runs any more.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from autocomp.errors import ConfigError, Interrupted
from autocomp.plugins import Registry
from autocomp.results import RunDir, read_json

__all__ = ["run_worker"]


def run_worker(run_dir: Path | str, storage: str, registry: Registry, on_event=None, *,
               wait_s: float = 0.0) -> dict[str, Any]:
    """Run trials of the search in ``run_dir`` whose study is in ``storage`` until the budget is used
    or the search closes the study; return what this worker did (``trials``: the numbers of the
    trials it ran). Waits up to ``wait_s`` seconds for the search to record its base model. Raises
    :class:`ConfigError` for a run it cannot join, :class:`Interrupted` when stopped (SIGTERM,
    SIGINT): the trials it finished stay in the study, and a worker started again goes on."""
    from autocomp.search import _StopOnSignal

    with _StopOnSignal() as stop:
        return _run_worker(RunDir(Path(run_dir)), storage, registry, on_event or (lambda kind, data: None), stop,
                           wait_s)


def _manifest(run: RunDir, wait_s: float, stop) -> dict[str, Any]:
    """The search's ``run.json``, once it has recorded its base model (written after it)."""
    deadline = time.monotonic() + wait_s
    while not run.exists():
        if time.monotonic() >= deadline:
            what = "is not an autocomp run directory" if run.root.is_dir() else "does not exist"
            raise ConfigError(f"{run.root} {what} (no run.json): give the --out of a search started with --storage, "
                              "or --wait SECONDS for one still measuring its base model")
        with stop.interruptible():
            time.sleep(0.5)
    manifest = read_json(run.manifest)
    if manifest.get("storage") != "external":
        raise ConfigError(f"{run.root} keeps its study in its own SQLite file (study.db), which other processes "
                          "cannot share: start the search with --storage postgresql://... to add workers")
    if manifest.get("status") == "complete":
        raise ConfigError(f"the search in {run.root} has finished: there is nothing left to run")
    return manifest


def _space_file(manifest: dict[str, Any], run: RunDir) -> Path:
    """The search's space, from the text its manifest recorded, in a file of the worker's own."""
    import tempfile

    text = manifest.get("space")
    if not isinstance(text, str):
        raise ConfigError(f"{run.manifest} records no search space text: start the search again with this version")
    handle, path = tempfile.mkstemp(prefix="autocomp-space-", suffix=".toml")
    with os.fdopen(handle, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def _config(manifest: dict[str, Any], run: RunDir, storage: str):
    """The search's configuration, as its manifest recorded it, to join it."""
    from autocomp.search import SearchConfig

    names = {f.name for f in dataclasses.fields(SearchConfig)}
    recorded = {k: v for k, v in manifest["config"].items() if k in names}
    if recorded.get("space") is not None:
        recorded["space"] = Path(recorded["space"])
    return SearchConfig(**{**recorded, "out": run.root, "storage": storage, "resume": True})


def _run_worker(run: RunDir, storage: str, registry: Registry, on_event, stop, wait_s: float) -> dict[str, Any]:
    import optuna

    from autocomp.proposals import MethodToggles, StrengthSteps
    from autocomp.trial import WORKER
    from autocomp.search import (
        RUN_STARTED,
        Objective,
        _baseline,
        _budget_used,
        _open_study,
        _process_name,
        optimize_shared,
        prepare,
    )
    from autocomp.trial import CLOSED

    try:
        manifest = _manifest(run, wait_s, stop)
        config = _config(manifest, run, storage)
        with stop.interruptible():  # loading the workload may train the built-in model on first use
            # the space as the search read it (run.json), wherever its file is or is not here
            space = _space_file(manifest, run)
            try:
                prep = prepare(dataclasses.replace(config, space=space), registry)
            finally:
                space.unlink(missing_ok=True)
            baseline, concrete = _baseline(prep, on_event)  # and checks the model and data are the same
    except KeyboardInterrupt:
        raise Interrupted("worker stopped before its first trial; nothing was done") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # its own sampler seed: with the search's, it would draw the search's settings again
    study = _open_study(prep, load_only=True, sampler_seed=int.from_bytes(os.urandom(4), "little"))
    if study.user_attrs.get(RUN_STARTED) != manifest.get("started"):
        raise ConfigError(f"the study in that storage belongs to another run than {run.root}: give the --storage its "
                          "search was started with")
    name = _process_name()
    toggles = MethodToggles(concrete, config.trials)
    proposals = [toggles, StrengthSteps(concrete, config.trials)]
    objective = Objective(prep, concrete, baseline, on_event, stop, toggles, worker=name)
    on_event("worker_start", {"worker": name, "trials": config.trials})
    try:
        if not stop.requested and not study.user_attrs.get(CLOSED) and not _budget_used(study, config.trials):
            optimize_shared(study, objective, config.trials, callbacks=[*proposals, stop.after_trial])
    except KeyboardInterrupt:
        stop.requested = True
    mine = sorted(t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(WORKER) == name)
    result = {"run_dir": str(run.root), "worker": name, "trials": mine}
    if stop.requested:
        raise Interrupted(f"worker stopped after {len(mine)} trial(s); they are in the study. Start it again to go "
                          "on", result)
    return result
