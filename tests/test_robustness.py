"""Failures and interruptions: a failing candidate is a failed trial, SIGTERM leaves a resumable run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass

import pytest

from autocomp import hookimpl
from autocomp.errors import CandidateError
from autocomp.method import FixedParam, Method
from autocomp.search import SearchConfig, run_search

from .conftest import FAST_TIMING, builtin_plugins

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
