"""`autocomp worker`: processes sharing one search's study on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from autocomp.cli import main

from .test_search import FAST_SPACE

# slower trials than test_search's (more fine-tuning steps), so that a worker starting a few
# seconds after the search still finds trials to run
SPACE = FAST_SPACE.replace("steps = 15", "steps = 120")


def _autocomp(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autocomp.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _search(url: str, out, space, trials: int, *extra: str) -> subprocess.Popen:
    return _autocomp("search", "--workload", "digits-tiny", "--target", "jetson", "--space", str(space),
                     "--max-drop", "0.5", "--trials", str(trials), "--storage", url, "--out", str(out), "--json",
                     *extra)


def _study(storage):
    import optuna

    return optuna.load_study(study_name="autocomp", storage=storage)


def _storage(url: str):
    """One connection pool for all the test's reads of the study."""
    import optuna

    return optuna.storages.RDBStorage(url)


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


def test_a_worker_shares_the_search_and_the_search_writes_the_summary(postgres, tmp_path, space, tiny_workload,
                                                                     capsys):
    from autocomp.proposals import is_sibling

    # a password in the URL (trust authentication ignores it) must not reach run.json
    url, out = postgres("shared").replace("postgres@", "postgres:s3cret@"), tmp_path / "run"
    worker = _autocomp("worker", str(out), "--storage", url, "--wait", "300", "--json")
    search = _search(url, out, space, 10)
    try:
        s_out, s_err = search.communicate(timeout=600)
        w_out, w_err = worker.communicate(timeout=120)
    finally:
        search.kill(), worker.kill()
    assert search.returncode == 0, s_err
    assert worker.returncode == 0, w_err
    summary, done = json.loads(s_out), json.loads(w_out)
    trials = [t for t in _study(_storage(url)).get_trials() if not is_sibling(t)]
    by = {t.number: t.user_attrs.get("worker") for t in trials}
    # both ran trials of the one budget, each trial once, every one finished and recorded
    assert done["trials"] and set(done["trials"]) == {n for n, w in by.items() if w == done["worker"]}
    assert len(set(by.values())) == 2 and None not in by.values()
    assert 10 <= len(trials) <= 11  # the two may each start one when a single trial of the budget is left
    assert all(t.state.is_finished() for t in trials) and summary["trials"]["total"] == len(trials)
    for t in trials:
        assert json.loads((out / "trials" / f"{t.number:04d}" / "metrics.json").read_text())["status"] in (
            "complete", "failed", "rejected")
    assert summary["status"] == "complete" and summary["pareto"]
    assert all(os.path.exists(m["artifact"]) for m in summary["pareto"])
    manifest = (out / "run.json").read_text()
    assert "s3cret" not in manifest and "postgresql+psycopg://postgres:***@/shared" in manifest

    # a finished search takes no worker, and its study no new search
    assert main(["worker", str(out), "--storage", url]) == 2
    assert "has finished" in " ".join(capsys.readouterr().err.split())
    again = _search(url, tmp_path / "other", space, 2)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and "already holds the study of another search" in " ".join(err.split())
    assert not (tmp_path / "other").exists()


def test_the_trial_of_a_worker_killed_mid_trial_is_failed_by_its_heartbeats(postgres, tmp_path, space, tiny_workload):
    from optuna.trial import TrialState

    url, out = postgres("killed"), tmp_path / "run"
    storage = _storage(url)
    worker = _autocomp("worker", str(out), "--storage", url, "--wait", "300")
    # a trial silent for 4 s is failed: long enough that a loaded machine does not fail a live one
    search = _search(url, out, space, 10, "--heartbeat", "2")
    name, killed, deadline = None, None, time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and search.poll() is None:
        time.sleep(0.2)
        try:
            running = _study(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - the search has not created its study yet
            continue
        for t in running:
            if t.user_attrs.get("worker", "").endswith(f":{worker.pid}"):
                name, killed = t.user_attrs["worker"], t.number
                os.kill(worker.pid, signal.SIGKILL)
                break
    try:
        assert killed is not None, "the worker never ran a trial"
        worker.communicate(timeout=60)
        s_out, s_err = search.communicate(timeout=600)
    finally:
        search.kill(), worker.kill()
    assert search.returncode == 0, s_err
    trial = _study(storage).trials[killed]
    assert trial.state == TrialState.FAIL and trial.user_attrs["worker"] == name
    summary = json.loads(s_out)
    [failure] = [f for f in summary["failures"] if f["trial"] == killed]
    assert "ended without closing it" in failure["reason"]
    assert not _study(storage).get_trials(states=(TrialState.RUNNING,))


def test_a_worker_refuses_a_run_it_cannot_join(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["worker", str(run), "--storage", "postgresql+psycopg://u@/db"]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"storage": "study.db", "status": "running"}))
    assert main(["worker", str(run), "--storage", "postgresql+psycopg://u@/db"]) == 2
    assert "own SQLite file" in " ".join(capsys.readouterr().err.split())


def test_a_storage_url_whose_driver_is_missing_is_a_clear_error(tmp_path, registry, tiny_workload, capsys):
    import importlib.util

    if importlib.util.find_spec("pymysql") is not None:
        pytest.skip("pymysql is installed here")
    out = tmp_path / "run"
    assert main(["search", "--workload", "digits-tiny", "--storage", "mysql+pymysql://u@h/db", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs a database driver that is not installed (pymysql)" in err and "postgresql+psycopg://" in err
    assert not out.exists()


def test_a_storage_password_is_kept_out_of_messages_and_the_manifest():
    from autocomp.search import _safe_url

    assert _safe_url("postgresql+psycopg://me:s3cret@db.lan:5432/big") == "postgresql+psycopg://me:***@db.lan:5432/big"
    assert "s3cret" not in _safe_url("not a url s3cret")


def test_a_trial_failed_as_silent_by_another_process_while_it_ran_costs_the_trial_not_the_process(tmp_path):
    """Another process fails this one's running trial (its heartbeats were late: a paused machine);
    Optuna then refuses the trial's result. The process goes on with the budget."""
    import optuna
    from optuna.trial import TrialState

    from autocomp.search import optimize_shared

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])

    def objective(trial):
        if trial.number == 1:  # what fail_stale_trials in another process does
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        return trial.suggest_float("x", 0, 1), 1.0

    optimize_shared(study, objective, trials=4)
    states = [t.state for t in study.trials]
    assert states[1] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 3 and len(states) == 4
