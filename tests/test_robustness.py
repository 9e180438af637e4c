"""Failures and interruptions: a failing candidate is a failed trial, SIGTERM leaves a resumable run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, replace

import pytest

from autocomp import hookimpl
from autocomp.errors import CandidateError
from autocomp.method import FixedParam, Method
from autocomp.search import SearchConfig, run_search

from .conftest import FAST_TIMING, builtin_plugins, signal_before

SPACE = """
[prune]
ratio = [0.0, 0.5]
round_to = 2

[flaky]
"""


@dataclass(frozen=True)
class _FlakyConfig:
    pass


class _Flaky(Method):
    """Fails every other candidate, the way a method fails on a layer it cannot handle."""

    name, stage, config_type = "flaky", "structural", _FlakyConfig
    order = 99

    def parameters(self, config, base):
        return [FixedParam("on", True)]

    def apply(self, model, setting, config, ctx):
        if ctx.seed % 2 == 1:
            raise CandidateError("flaky cannot handle this candidate")
        return model


def test_a_failing_candidate_is_a_failed_trial_and_the_search_goes_on(tmp_path, tiny_workload):
    from autocomp.plugins import load_registry

    plugin = types.ModuleType("flaky_plugin")
    plugin.register_methods = hookimpl(lambda register: register(_Flaky()))
    registry = load_registry(entry_points=[], extra_plugins=[*builtin_plugins(), ("flaky", plugin)])
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    result = run_search(SearchConfig(workload="digits-tiny", target_options=FAST_TIMING, space=space, max_drop=1.0,
                                     trials=4, out=tmp_path / "run", final_rounds=1), registry)
    trials = result.summary["trials"]
    assert trials["total"] == 4 and trials["failed"] == 2 and trials["complete"] == 2
    assert {f["reason"] for f in result.summary["failures"]} == {"CandidateError: flaky cannot handle this candidate"}
    failed = json.loads((tmp_path / "run" / "trials" / "0001" / "metrics.json").read_text())
    assert failed == {**failed, "status": "failed", "reason": "CandidateError: flaky cannot handle this candidate"}
    assert result.exit_code == 0


def test_an_apply_that_returns_no_model_or_no_file_fails_the_candidate_with_the_fix(tmp_path, tiny_workload):
    """What apply returns is checked where it is used: a structural method changing the model in
    place and returning None, or a post-export method returning a file it never wrote, fails that
    candidate with a reason naming the method, not a NoneType error further on."""
    import optuna

    from autocomp.candidate import build_artifact, build_structure
    from autocomp.method import BaseModelInfo, CandidateContext
    from autocomp.space import parse_space

    class InPlace(_Flaky):
        name = "inplace"

        def apply(self, model, setting, config, ctx):
            model.fc.weight.data.mul_(1.0)

    class NoFile(_Flaky):
        name, stage = "nofile", "post_export"

        def apply(self, onnx_path, setting, config, ctx):
            return ctx.work_dir / "never_written.onnx"

    space = parse_space({"inplace": {}, "nofile": {}}, {"inplace": InPlace(), "nofile": NoFile()}, source="s.toml")
    concrete = space.concrete(BaseModelInfo(None, None, tmp_path / "m.onnx", None))
    spec = concrete.sample(optuna.create_study(directions=["maximize", "minimize"]).ask())
    ctx = CandidateContext(workload=tiny_workload, teacher=tiny_workload.model, target=None, work_dir=tmp_path, seed=0)
    with pytest.raises(CandidateError, match=r"method 'inplace': apply\(\) returned NoneType, not the model"):
        build_structure(tiny_workload.model, spec, concrete, ctx)
    (tmp_path / "fp32.onnx").write_bytes(b"an fp32 export")
    with pytest.raises(CandidateError, match=r"method 'nofile': apply\(\) returned .*never_written.onnx'\), not the path"):
        build_artifact(tmp_path / "fp32.onnx", spec, concrete, ctx)


FAST_SPACE = """
[prune]
ratio = [0.0, 0.5]
round_to = 2

[distill]
steps = 5

[quantize]
bits = [8, 32]
"""


def _search(out, trials, extra=()):
    space = out.parent / "fast.toml"
    space.write_text(FAST_SPACE)
    return [sys.executable, "-m", "autocomp.cli", "search", "--workload", "digits-tiny", "--trials", str(trials),
            "--out", str(out), "--space", str(space), "-T", "min_s=0.1", *extra]


def _fast_config(tmp_path, trials, space_text=FAST_SPACE):
    space = tmp_path / "fast.toml"
    space.write_text(space_text)
    return SearchConfig(workload="digits-tiny", target_options=FAST_TIMING, space=space, max_drop=1.0,
                        trials=trials, out=tmp_path / "run", final_rounds=1)


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_sigterm_leaves_an_interrupted_resumable_run(tmp_path, tiny_workload, _cache_dir):
    out = tmp_path / "run"
    env = {**os.environ, "AUTOCOMP_CACHE_DIR": str(_cache_dir)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(_search(out, 50), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("trials/*/metrics.json")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no trial finished (exit {proc.poll()}); stderr:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:  # never leave a search running behind a failed test
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    assert "Resume with: autocomp search --resume" in " ".join(err.split())
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    done = json.loads((out / "pareto.json").read_text())["trials"]["total"]
    assert 1 <= done < 50

    resumed = subprocess.run(_search(out, done + 1, ["--resume"]), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode in (0, 1), resumed.stderr
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["status"] == "complete" and summary["trials"]["total"] == done + 1
    assert json.loads((out / "run.json").read_text())["resumed"] == 1


def test_a_stop_while_optuna_records_a_trial_ends_the_search_cleanly(tmp_path, registry, tiny_workload, monkeypatch):
    """SIGTERM that lands after a trial's work, while Optuna tells the study the trial's values
    (where a raise once escaped Optuna as an UnboundLocalError: exit 1, the run left "running"),
    ends the search after that trial: recorded complete, the run interrupted and resumable."""
    import optuna
    import optuna.study._optimize as optimize  # Optuna's trial loop, and the private function it tells with

    from autocomp.errors import Interrupted

    signal_before(monkeypatch, optimize, "_tell_with_warning")
    config = _fast_config(tmp_path, trials=3)
    with pytest.raises(Interrupted, match="Resume with"):
        run_search(config, registry)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    run = [t.state for t in study.trials if "sibling_of" not in t.user_attrs]
    assert [s for s in run if s != optuna.trial.TrialState.WAITING] == [optuna.trial.TrialState.COMPLETE]

    monkeypatch.undo()
    result = run_search(replace(config, resume=True, trials=2), registry)
    assert result.summary["status"] == "complete" and result.summary["trials"]["complete"] >= 2


def test_a_stop_during_the_final_measurements_leaves_the_run_interrupted_and_resumable(
        tmp_path, registry, tiny_workload, monkeypatch):
    """SIGTERM while the finished search re-measures its Pareto set ends it with the run recorded
    interrupted (not killed mid-write, not left "running"), no artifact removed; --resume runs no
    new trial and measures again."""
    import autocomp.search as search
    from autocomp.errors import Interrupted

    signal_before(monkeypatch, search, "_final_measurements")
    config = _fast_config(tmp_path, trials=2)
    with pytest.raises(Interrupted, match="Resume with"):
        run_search(config, registry)
    summary = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert summary["status"] == "interrupted" and summary["trials"]["total"] == 2
    assert all("final_latency_ms" not in m for m in summary["pareto"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
    assert len(list((tmp_path / "run" / "trials").glob("*/model.onnx"))) == 2

    monkeypatch.undo()
    result = run_search(replace(config, resume=True), registry)
    assert result.summary["status"] == "complete" and result.summary["trials"]["total"] == 2
    assert result.summary["pareto"] and all("final_latency_ms" in m for m in result.summary["pareto"])


def test_a_stop_before_a_trial_starts_costs_no_trial_and_its_anchor_is_queued_again_on_resume(
        tmp_path, registry, tiny_workload, monkeypatch):
    """SIGTERM while Optuna readies the second trial (an enqueued anchor): that trial never starts,
    is neither counted nor listed as a failure, and the resumed run enqueues the anchor again, once."""
    import optuna

    from autocomp.errors import Interrupted

    signal_before(monkeypatch, optuna.Study, "ask", calls=(2,))
    config = _fast_config(tmp_path, trials=3)
    reports = _Recorder()
    logging.getLogger("optuna").addHandler(reports)  # where Optuna's trial loop reports go
    try:
        with pytest.raises(Interrupted, match=r"after 1 trials \(and 1 cut short by a stop, not counted\)"):
            run_search(config, registry)
    finally:
        logging.getLogger("optuna").removeHandler(reports)
    assert not [m for m in reports.messages if " failed " in m]  # no report of the trial (with a traceback)
    summary = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert summary["trials"]["total"] == 1 and summary["trials"]["interrupted"] == 1 and not summary["failures"]
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    (stopped,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert stopped.user_attrs["failure_reason"] == "KeyboardInterrupt: stopped before it started"
    anchor = stopped.system_attrs["fixed_params"]

    monkeypatch.undo()
    result = run_search(replace(config, resume=True, trials=2), registry)
    trials = result.summary["trials"]
    assert (trials["total"], trials["interrupted"], trials["failed"]) == (2, 1, 0)
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    again = [t for t in study.trials if t.number != stopped.number and t.system_attrs.get("fixed_params") == anchor]
    assert len(again) == 1


def test_a_stop_while_the_base_model_is_measured_leaves_nothing_behind(tmp_path, registry, tiny_workload, monkeypatch):
    """SIGTERM before the first trial: the run is interrupted (exit 3), its half-made directory
    removed, and the same command runs afresh."""
    import autocomp.search as search
    from autocomp.errors import Interrupted

    signal_before(monkeypatch, search, "_measure_baseline")
    config = _fast_config(tmp_path, trials=1)
    with pytest.raises(Interrupted, match="measuring the base model; nothing was kept: run the same command again"):
        run_search(config, registry)
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert run_search(config, registry).summary["trials"]["total"] == 1


def test_a_stop_while_a_sibling_is_added_keeps_the_sibling(tmp_path, registry, tiny_workload, monkeypatch):
    """SIGTERM during the storage write that adds a sibling: the write is not cut, the sibling
    keeps its files, and the search ends after its trial."""
    import optuna

    from autocomp.errors import Interrupted
    from autocomp.trial import FILES_IN

    # a sibling's, not an enqueued one (enqueue_trial adds a trial too)
    signal_before(monkeypatch, optuna.Study, "add_trial", when=lambda study, trial: "sibling_of" in trial.user_attrs)
    with pytest.raises(Interrupted):
        run_search(_fast_config(tmp_path, trials=4, space_text=FAST_SPACE + "optional = true\n"), registry)
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    (sibling,) = [t for t in finished if "sibling_of" in t.user_attrs]
    trials = [t for t in finished if "sibling_of" not in t.user_attrs]
    assert trials[-1].number == sibling.user_attrs["sibling_of"]  # the search ended after the sibling's trial
    assert {t.state for t in finished} == {optuna.trial.TrialState.COMPLETE}
    assert (tmp_path / "run" / sibling.user_attrs[FILES_IN] / "model.onnx").exists()


def test_a_trial_whose_process_died_is_a_failed_trial_not_retried(tmp_path, registry, tiny_workload):
    """A trial a resumed run finds RUNNING (its process killed, or crashed by its candidate) is
    closed as a failed trial of the budget with a reason, and not enqueued again."""
    import optuna

    config = _fast_config(tmp_path, trials=1)
    run_search(config, registry)
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    orphan = study.ask()  # the next anchor, left RUNNING as by a process that died running it
    anchor = study.trials[orphan.number].system_attrs["fixed_params"]
    result = run_search(replace(config, resume=True, trials=2), registry)
    trials = result.summary["trials"]
    assert (trials["total"], trials["failed"], trials["interrupted"]) == (2, 1, 0)
    (failure,) = result.summary["failures"]
    assert "ended without closing it" in failure["reason"]
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [t.number for t in study.trials if t.system_attrs.get("fixed_params") == anchor] == [orphan.number]


def test_a_candidate_that_exits_the_process_is_a_failure_on_resume_not_retried(
        tmp_path, registry, tiny_workload, monkeypatch):
    """A candidate whose code calls sys.exit (SystemExit) ends the process, its trial left RUNNING;
    the resumed run counts it as a failed trial, not as one a stop cut short, and does not queue
    its anchor again (it would end every resume)."""
    import optuna

    import autocomp.candidate as candidate

    build = candidate.build_structure

    def exits(*args, **kwargs):
        raise SystemExit("a plugin called sys.exit")

    monkeypatch.setattr(candidate, "build_structure", exits)
    config = _fast_config(tmp_path, trials=2)
    with pytest.raises(SystemExit):
        run_search(config, registry)
    monkeypatch.setattr(candidate, "build_structure", build)
    result = run_search(replace(config, resume=True), registry)
    trials = result.summary["trials"]
    assert (trials["total"], trials["failed"], trials["interrupted"]) == (2, 1, 0)
    assert result.summary["failures"][0]["reason"] == "SystemExit: a plugin called sys.exit"
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    first = study.trials[0].system_attrs["fixed_params"]
    assert [t.number for t in study.trials if t.system_attrs.get("fixed_params") == first] == [0]


def test_a_stop_lost_in_a_finalizer_is_kept_and_not_reported_as_an_error(monkeypatch):
    """A stop whose raise lands in a finalizer (garbage collection) cannot end the work there:
    Python drops it and reports it (sys.unraisablehook prints "Exception ignored" and a traceback).
    It is recorded, and not reported; any other such error still is."""
    from autocomp.search import _StopOnSignal

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_type))

    class Finalized:
        def __init__(self, error=None):
            self.error = error

        def __del__(self):
            if self.error:
                raise self.error
            signal.raise_signal(signal.SIGTERM)

    with _StopOnSignal() as stop, stop.interruptible():
        Finalized()  # dropped at once: its finalizer runs here
        assert stop.requested
        Finalized(ValueError("a real error"))
    assert reported == [ValueError]
    assert sys.unraisablehook.__name__ == "<lambda>"  # put back

    def other(unraisable):
        pass

    with _StopOnSignal():
        sys.unraisablehook = other  # replaced by someone else meanwhile: left as they set it
    assert sys.unraisablehook is other


STOPPED_IN_EXEC = """
import signal, sys
from autocomp.search import _StopOnSignal

with _StopOnSignal() as stop, stop.interruptible():
    try:  # the stop lands in code run by exec() from a string, as in a dataclass made by a lazy import
        exec("signal.raise_signal(signal.SIGTERM)")
    except KeyboardInterrupt:
        pass
sys.exit(3)
"""


def test_a_stop_inside_exec_still_exits_with_the_interrupted_status(tmp_path):
    """A stop handled after it was raised through exec()'d code: `python -m` exits 3, where
    CPython would otherwise kill the process with SIGINT at exit (seen once in 25 SIGTERMs)."""
    (tmp_path / "stopped_in_exec.py").write_text(STOPPED_IN_EXEC)
    proc = subprocess.run([sys.executable, "-m", "stopped_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr


def test_builtin_model_training_is_deterministic(torch_threads):
    import torch

    from autocomp_plugins.digits import DigitsConfig, digits_workload

    config = DigitsConfig(image_size=8, width=4, epochs=1)
    first = digits_workload(config, cache=False).model.state_dict()
    second = digits_workload(config, cache=False).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_space_show_lists_the_concrete_parameters(registry, tiny_workload, capsys):
    from autocomp.cli import main

    assert main(["space", "show", "--workload", "digits-tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["parameters"]
    assert {r["method"] for r in rows} == {"prune", "distill", "quantize"}
    assert {"method": "prune", "name": "stem.0"}.items() <= next(r for r in rows if r["name"] == "stem.0").items()
