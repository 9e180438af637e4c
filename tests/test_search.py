"""A whole search on the tiny digits workload, through the library and through the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from autocomp.cli import main
from autocomp.errors import ConfigError
from autocomp.ort import run_batches
from autocomp.results import sha256_of
from autocomp.search import SearchConfig, run_search

from .conftest import FAST_TIMING, signal_before

FAST_SPACE = """
[prune]
ratio = [0.0, 0.5]
round_to = 2

[distill]
temperature = [1.0, 4.0]
alpha = [0.0, 0.9]
steps = 15

[quantize]
bits = [8, 32]
"""


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "fast.toml"
    path.write_text(FAST_SPACE)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, space_file, tiny_workload):
    from autocomp.plugins import load_registry

    from .conftest import builtin_plugins

    registry = load_registry(entry_points=[], extra_plugins=builtin_plugins())
    out = tmp_path_factory.mktemp("runs") / "run"
    events = []
    config = SearchConfig(workload="digits-tiny", target="cpu", target_options=FAST_TIMING, space=space_file,
                          max_drop=0.5, trials=3, out=out, keep_all=True, final_rounds=1)
    result = run_search(config, registry, on_event=lambda kind, data: events.append(kind))
    return registry, config, result, events


def test_run_directory_layout(finished_run):
    _, config, result, events = finished_run
    root = result.run_dir
    manifest = json.loads((root / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["target"]["name"] == "cpu"
    assert manifest["versions"]["onnxruntime"] and manifest["target"]["facts"]["cpu_model"]
    assert (root / "study.db").exists() and (root / "baseline" / "model.onnx").exists()
    for n in range(3):
        trial = root / "trials" / f"{n:04d}"
        assert json.loads((trial / "spec.json").read_text())["prune"]
        assert json.loads((trial / "metrics.json").read_text())["status"] == "complete"
    assert events.count("trial_complete") == 3 and events[0] == "baseline_start"


def test_pareto_members_are_the_deployed_artifacts(finished_run, tiny_workload):
    _, _, result, _ = finished_run
    pareto = json.loads((result.run_dir / "pareto.json").read_text())
    assert pareto["pareto"] and result.exit_code == 0
    for member in pareto["pareto"]:
        artifact = Path(member["artifact"])
        assert sha256_of(artifact) == member["sha256"]
        outputs = run_batches(artifact, tiny_workload.val.inputs.numpy())
        accuracy = float(np.mean(outputs.argmax(1) == tiny_workload.val.targets.numpy()))
        assert accuracy == pytest.approx(member["metric"], abs=1e-12)
        assert member["drop"] == pytest.approx(pareto["baseline"]["metric"] - member["metric"])
        # the search minimises each measurement's fastest run (the default statistic) and keeps the p50
        assert pareto["latency_statistic"] == "min" and member["latency_ms"] <= member["latency_p50_ms"]
        assert member["speedup"] == pytest.approx(pareto["baseline"]["latency_ms"] / member["latency_ms"])
        assert member["final_speedup"] == pytest.approx(pareto["baseline"]["final_latency_ms"] / member["final_latency_ms"])
        # the held-out test split, never seen by the search, scores the same artifact
        test = run_batches(artifact, tiny_workload.test.inputs.numpy())
        assert member["test_metric"] == pytest.approx(float(np.mean(test.argmax(1) == tiny_workload.test.targets.numpy())))
        assert member["test_drop"] == pytest.approx(pareto["baseline"]["test_metric"] - member["test_metric"])
        metrics = json.loads((result.run_dir / "trials" / f"{member['trial']:04d}" / "metrics.json").read_text())
        assert metrics["latency_ms"] == metrics["latency"]["min_ms"] == member["latency_ms"]


def test_quantized_artifact_accuracy_is_what_is_reported(finished_run, tiny_workload):
    """Trial 0 is the enqueued 'uniform' anchor: every layer int8. Its reported metric is the
    quantized ONNX file's, which differs from the fp32 model's."""
    _, _, result, _ = finished_run
    trial = result.run_dir / "trials" / "0000"
    spec = json.loads((trial / "spec.json").read_text())
    assert set(spec["quantize"].values()) == {"int8"}
    graph = onnx.load(str(trial / "model.onnx")).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    metrics = json.loads((trial / "metrics.json").read_text())
    outputs = run_batches(trial / "model.onnx", tiny_workload.val.inputs.numpy())
    assert metrics["metric"] == pytest.approx(float(np.mean(outputs.argmax(1) == tiny_workload.val.targets.numpy())), abs=1e-12)


def test_resume_adds_trials_to_the_same_study(finished_run):
    registry, config, result, _ = finished_run
    from dataclasses import replace

    resumed = run_search(replace(config, trials=4, resume=True), registry)
    assert resumed.summary["trials"]["total"] == 4
    assert json.loads((result.run_dir / "run.json").read_text())["resumed"] == 1


def test_resume_refuses_another_latency_statistic(finished_run):
    registry, config, result, _ = finished_run
    from dataclasses import replace

    from autocomp.errors import ConfigError

    before = sorted(p.name for p in (result.run_dir / "trials").iterdir())
    with pytest.raises(ConfigError, match="searched on the min latency .* pass --latency-statistic min"):
        run_search(replace(config, trials=9, resume=True, latency_statistic="p50"), registry)
    assert sorted(p.name for p in (result.run_dir / "trials").iterdir()) == before  # nothing lost or added


def _with_workload(registry, change):
    """``registry`` with its digits-tiny workload passed through ``change`` on every call."""
    from autocomp.plugins import WorkloadEntry

    entry = registry.workloads["digits-tiny"]
    other = copy.copy(registry)
    other.workloads = {**registry.workloads,
                       "digits-tiny": WorkloadEntry("digits-tiny", lambda: change(entry.factory()), "", "test")}
    return other


def _nudged(workload, add=0.0, times=1.0):
    """``workload`` with its first weight changed: ``w * times + add``."""
    from dataclasses import replace

    import torch

    model = copy.deepcopy(workload.model)
    with torch.no_grad():
        next(model.parameters()).mul_(times).add_(add)
    return replace(workload, model=model)


def test_resume_refuses_a_workload_that_gives_another_model_or_data(finished_run):
    """A factory that initialises its model at random (or splits its data at random) would have the
    resumed trials compress another model than the baseline measured: refused, nothing written."""
    from dataclasses import replace

    from autocomp.errors import ConfigError
    from autocomp.workload import Split

    registry, config, result, _ = finished_run
    before = sorted(p.name for p in (result.run_dir / "trials").iterdir())
    manifest = (result.run_dir / "run.json").read_text()

    def other_split(workload):
        return replace(workload, val=Split(workload.val.inputs.flip(0), workload.val.targets.flip(0)))

    for change, changed in ((lambda w: _nudged(w, add=1e-3), "another model"),
                            (other_split, "another validation split")):
        with pytest.raises(ConfigError, match=f"searched with {changed} of workload 'digits-tiny'"):
            run_search(replace(config, trials=9, resume=True), _with_workload(registry, change))
    assert sorted(p.name for p in (result.run_dir / "trials").iterdir()) == before  # nothing lost or added
    assert (result.run_dir / "run.json").read_text() == manifest

    # the model trained again elsewhere: other bits, the same function within float noise
    retrained = _with_workload(registry, lambda w: _nudged(w, times=1 + 1e-7))
    resumed = run_search(replace(config, trials=1, resume=True), retrained)  # no trial left to run
    assert sorted(p.name for p in (result.run_dir / "trials").iterdir()) == before
    assert json.loads((result.run_dir / "run.json").read_text())["resumed"] >= 1 and resumed.exit_code == 0


def test_the_workload_fingerprint_reads_any_state_dict():
    """Extra state, sparse, boolean and uninitialised (lazy) entries: a digest, never an error."""
    import torch

    from autocomp.workload import Split, Workload, fingerprint

    class Odd(torch.nn.Module):
        def __init__(self, extra):
            super().__init__()
            self.extra = extra
            self.linear = torch.nn.Linear(4, 2)
            self.lazy = torch.nn.LazyLinear(2)
            self.register_buffer("mask", torch.ones(3, dtype=torch.bool))
            self.register_buffer("sparse", torch.eye(3).to_sparse())

        def get_extra_state(self):
            return {"extra": self.extra}

        def set_extra_state(self, state):
            self.extra = state["extra"]

        def forward(self, x):
            return self.linear(x)

    def digests(extra):
        x = torch.zeros(4, 4)
        split = Split(x, torch.zeros(4, dtype=torch.long))
        return fingerprint(Workload(name="odd", model=Odd(extra), example_input=x[:1], train=split, val=split))

    torch.manual_seed(0)
    first = digests(1)
    torch.manual_seed(0)
    assert digests(1) == first
    torch.manual_seed(0)
    assert digests(2)["model"] != first["model"] and digests(2)["validation split"] == first["validation split"]


def test_a_run_from_before_the_latency_statistic_resumes_on_the_p50(tmp_path, registry, space_file):
    from dataclasses import replace

    config = SearchConfig(workload="digits-tiny", target="cpu", target_options=FAST_TIMING, space=space_file,
                          max_drop=0.5, trials=1, out=tmp_path / "run", final_rounds=0, latency_statistic="p50")
    run_search(config, registry)
    baseline = tmp_path / "run" / "baseline" / "metrics.json"
    old = json.loads(baseline.read_text())
    # as written before --latency-statistic existed (and before the workload's digests were recorded)
    del old["latency_statistic"], old["latency_ms"], old["workload_sha256"]
    baseline.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="searched on the p50 latency"):
        run_search(replace(config, trials=2, resume=True, latency_statistic="min"), registry)
    # without recorded digests another model is not noticed: the run resumes as it did before them
    registry = _with_workload(registry, lambda w: _nudged(w, add=1e-3))
    resumed = run_search(replace(config, trials=2, resume=True), registry)
    assert resumed.summary["trials"]["total"] == 2
    assert resumed.summary["baseline"]["latency_ms"] == old["latency_p50_ms"]


def test_latency_statistic_p50_is_what_the_search_minimises(tmp_path, registry, space_file):
    config = SearchConfig(workload="digits-tiny", target="cpu", target_options=FAST_TIMING, space=space_file,
                          max_drop=0.5, trials=1, out=tmp_path / "run", final_rounds=0, latency_statistic="p50")
    result = run_search(config, registry)
    member = result.pareto[0]
    assert result.summary["latency_statistic"] == "p50" and member["latency_ms"] == member["latency_p50_ms"]
    with pytest.raises(ConfigError, match="--latency-statistic must be one of min, p50, p90, mean"):
        SearchConfig(latency_statistic="fastest")


def _cli(*args: str) -> int:
    return main(list(args))


def test_cli_exit_1_when_no_candidate_meets_the_constraints(tmp_path, registry, space_file, capsys):
    out = tmp_path / "run"
    code = _cli("search", "--workload", "digits-tiny", "--space", str(space_file), "--trials", "1",
                "--max-latency", "0.000001", "--out", str(out), "--json",
                "-T", "min_s=0.02", "-T", "min_runs=5")
    assert code == 1
    summary = json.loads(capsys.readouterr().out)
    # the cpu target predicts latency, so a hopeless candidate is rejected before any training
    assert summary["pareto"] == [] and summary["trials"]["feasible"] == 0
    assert summary["trials"]["complete"] + summary["trials"]["rejected_before_training"] == 1
    assert json.loads((out / "pareto.json").read_text())["pareto"] == []


def test_cli_json_on_a_stop_is_the_interrupted_runs_summary(tmp_path, registry, space_file, capsys, monkeypatch):
    """A job reading --json gets one document on a stop too: the summary written to pareto.json,
    its status "interrupted"; the exit code is 3."""
    import autocomp.search as search

    signal_before(monkeypatch, search, "_final_measurements")
    # as on a terminal, where rich's live progress sends what is printed to stdout to its console (stderr)
    monkeypatch.setenv("FORCE_COLOR", "1")
    out = tmp_path / "run"
    code = _cli("search", "--workload", "digits-tiny", "--space", str(space_file), "--trials", "1", "--max-drop", "1",
                "--out", str(out), "--json", "-T", "min_s=0.02", "-T", "min_runs=5")
    assert code == 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "interrupted" and summary == json.loads((out / "pareto.json").read_text())


def _bad_workload_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "bad_workloads.py").write_text(textwrap.dedent("""
        import torch
        from autocomp import Split, Workload

        class Unexportable(torch.nn.Module):
            def forward(self, x):
                return torch.special.bessel_j0(x).flatten(1)

        def unexportable():
            x = torch.randn(8, 1, 4, 4)
            y = torch.zeros(8, dtype=torch.long)
            return Workload(name="bad", model=Unexportable(), example_input=x[:1], train=Split(x, y), val=Split(x, y))

        def not_a_workload():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_workloads"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "jetsn"], "unknown target 'jetsn'"),
        (["--space", "{space_dir}/broken.toml"], "not valid TOML"),
        (["--space", "{space_dir}/unknown.toml"], "unknown method(s) pruning"),
        (["--workload", "no_such_module:factory"], "cannot import module 'no_such_module'"),
        (["--workload", "bad_workloads:not_a_workload"], "returned int, expected autocomp.Workload"),
        (["--workload", "bad_workloads:unexportable"], "cannot be exported to ONNX"),
        (["--max-drop", "5"], "--max-drop must lie in [0, 1]"),
    ],
)
def test_cli_bad_input_exit_2_and_no_half_written_run(tmp_path, monkeypatch, registry, capsys, args, message):
    _bad_workload_module(tmp_path, monkeypatch)
    (tmp_path / "broken.toml").write_text("[prune\n")
    (tmp_path / "unknown.toml").write_text("[pruning]\nratio = 0.5\n")
    out = tmp_path / "run"
    args = [a.replace("{space_dir}", str(tmp_path)) for a in args]
    code = _cli("search", "--workload", "digits-tiny", "--trials", "1", "--out", str(out), *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in " ".join(err.split()), err
    assert not out.exists()


def test_existing_run_directory_is_not_overwritten(tmp_path, registry, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert _cli("search", "--workload", "digits-tiny", "--out", str(out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "run.json").read_text() == "{}"


def test_help_is_fast_and_imports_no_heavy_package():
    code = ("import sys; from autocomp.cli import _parser; _parser().format_help(); "
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'optuna', 'numpy') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_candidates_predicted_too_slow_are_rejected_before_training(tmp_path, registry, space_file, capsys):
    """A predicted target prices the untrained structure; nothing is fine-tuned for a hopeless one."""
    out = tmp_path / "run"
    code = _cli("search", "--workload", "digits-tiny", "--target", "jetson", "--space", str(space_file),
                "--trials", "2", "--max-latency", "0.000001", "--out", str(out), "--json")
    assert code == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == {"name": "jetson-orin-nano", "measured": False}
    assert summary["trials"]["rejected_before_training"] == 2 and summary["trials"]["complete"] == 0
    metrics = json.loads((out / "trials" / "0000" / "metrics.json").read_text())
    assert metrics["status"] == "rejected" and "before training" in metrics["reason"]


def test_a_candidate_drawn_twice_is_listed_once(tmp_path, registry, tiny_workload):
    """With nothing left to sample every trial builds the same model; the Pareto set lists it
    once, under its first trial, with the repeats in ``same_as``."""
    space = tmp_path / "fixed.toml"
    space.write_text("[prune]\nratio = 0.3\nround_to = 8\n")
    config = SearchConfig(workload="digits-tiny", target="cpu", target_options=FAST_TIMING, space=space,
                          max_drop=0.5, trials=3, out=tmp_path / "run", final_rounds=1)
    result = run_search(config, registry)
    assert result.summary["trials"]["total"] == 3
    (member,) = result.summary["pareto"]
    assert member["trial"] == 0 and member["same_as"] == [1, 2]
    assert Path(member["artifact"]).exists()


def _optional_method_search(tmp_path, registry, space_text, **config):
    """A 4-trial search of ``space_text`` on the tiny workload; returns its result and its study."""
    import optuna

    space = tmp_path / "optional.toml"
    space.write_text(space_text)
    config = SearchConfig(workload="digits-tiny", target_options=FAST_TIMING, space=space, max_drop=0.5,
                          final_rounds=0, **{"target": "cpu", "trials": 4, "out": tmp_path / "run", **config})
    result = run_search(config, registry)
    storage = config.storage or f"sqlite:///{result.run_dir / 'study.db'}"
    return result, optuna.load_study(study_name="autocomp", storage=storage)


QUANTIZE_OPTIONAL = "[prune]\nratio = [0.2, 0.4]\nround_to = 8\n\n[quantize]\noptional = true\nbits = [8, 32]\n"


def _with_scaled_cpu_target(name: str, factor):
    """A registry of the built-in plugins and the cpu target registered again as ``name``, with
    each latency reading of a graph multiplied by ``factor(onnx_path)``: a device that is slower on
    some graphs than this host."""
    import dataclasses
    import types

    from autocomp import hookimpl
    from autocomp.plugins import load_registry
    from autocomp_plugins.cpu_target import CpuTarget

    from .conftest import builtin_plugins

    class Scaled(CpuTarget):
        def configure(self, options):
            return Scaled(super().configure(options).policy)

        def latency(self, onnx_path, input_shapes):
            stats, k = super().latency(onnx_path, input_shapes), factor(onnx_path)
            return dataclasses.replace(stats, p50_ms=stats.p50_ms * k, p90_ms=stats.p90_ms * k,
                                       mean_ms=stats.mean_ms * k, min_ms=stats.min_ms * k)

    Scaled.name, Scaled.aliases = name, ()
    plugin = types.ModuleType(name.replace("-", "_"))
    plugin.register_targets = hookimpl(lambda register: register(Scaled()))
    return load_registry(entry_points=[], extra_plugins=[*builtin_plugins(), (name, plugin)])


def test_a_front_member_is_tried_without_its_optional_method(tmp_path, tiny_workload):
    """The first trial (the uniform anchor, with quantization on) is alone on the front, so the
    search tries the same pruning without quantization, with the same fine-tuning seed, and records
    where that trial came from (siblings off: they would have built that setting already)."""
    # a device where int8 is surely slower than fp32: on this host's fast int8 kernels the tiny
    # model's int8 and fp32 readings are within the noise of each other, either way round
    registry = _with_scaled_cpu_target("cpu-slow-int8", lambda path: 4 if "QuantizeLinear" in _op_types(path) else 1)
    result, study = _optional_method_search(tmp_path, registry, QUANTIZE_OPTIONAL, siblings=False,
                                            target="cpu-slow-int8")
    first = study.trials[0]
    assert first.params["quantize.enabled"] is True
    (ablation,) = [t for t in study.trials if t.user_attrs.get("ablation_of") == 0]
    assert ablation.user_attrs["ablated"] == "quantize"
    assert ablation.params == {**{k: v for k, v in first.params.items() if not k.startswith("quantize.")},
                               "quantize.enabled": False}
    assert ablation.user_attrs["seed_of"] == 0  # fine-tuned like the trial it ablates
    # on this target int8 is slower than fp32 (and the anchors before it are int8 too): the ablation
    # joins the front and the summary says where it came from
    (member,) = [m for m in result.summary["pareto"] if m["trial"] == ablation.number]
    assert (member["ablation_of"], member["ablated"]) == (0, "quantize")


def test_a_front_member_is_tried_with_an_optional_method_it_left_out(tmp_path, registry, tiny_workload):
    """The anchors leave low-rank factorization off; the first one, alone on the front, is tried again
    with it put in (the ranks drawn by the sampler), everything else fixed, with the same seed."""
    import optuna

    _, study = _optional_method_search(tmp_path, registry, "[prune]\nratio = [0.2, 0.4]\nround_to = 8\n\n"
                                       "[lowrank]\noptional = true\nrank_ratio = [0.25, 1.0]\nlayers = \"all\"\n")
    first = study.trials[0]
    assert first.params["lowrank.enabled"] is False
    (addition,) = [t for t in study.trials if t.user_attrs.get("addition_of") == 0]
    assert addition.user_attrs["added"] == "lowrank" and addition.user_attrs["seed_of"] == 0
    assert addition.state == optuna.trial.TrialState.COMPLETE
    assert {k: v for k, v in addition.params.items() if not k.startswith("lowrank.")} == {
        k: v for k, v in first.params.items() if not k.startswith("lowrank.")}
    assert addition.params["lowrank.enabled"] is True
    assert any(k.startswith("lowrank.") and k != "lowrank.enabled" for k in addition.params)


def _siblings_of(study, number):
    return [t for t in study.trials if t.user_attrs.get("sibling_of") == number]


def _op_types(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_each_trained_candidate_is_also_scored_without_quantization(tmp_path, registry, tiny_workload):
    """Every trial with quantization on gets a sibling: its own trained model exported without
    quantization, scored and timed, added to the study without training and without using a trial
    of the budget; the toggles then never spend a trial on that setting."""
    result, study = _optional_method_search(tmp_path, registry, QUANTIZE_OPTIONAL, keep_all=True)
    budget = [t for t in study.trials if "sibling_of" not in t.user_attrs]
    assert len(budget) == result.summary["trials"]["total"] == 4
    assert not any(t.user_attrs.get("ablated") == "quantize" for t in budget)
    quantized = [t for t in budget if t.params["quantize.enabled"]]
    siblings = [t for t in study.trials if "sibling_of" in t.user_attrs]
    assert quantized and result.summary["trials"]["siblings"] == len(siblings)
    # one per trained trial: without quantization for the quantized ones, with it for the others
    # (none is over this test's accuracy budget), unless the study already tried that setting
    assert sorted(t.user_attrs["sibling_of"] for t in siblings) == sorted(
        t.number for t in budget if t.params["quantize.enabled"] or _siblings_of(study, t.number))
    val = tiny_workload.val.inputs.numpy()
    for source in quantized:
        (sibling,) = _siblings_of(study, source.number)
        assert sibling.user_attrs["ablated"] == "quantize"
        assert sibling.user_attrs["seed_of"] == source.user_attrs.get("seed_of", source.number)
        assert sibling.params == {**{k: v for k, v in source.params.items() if not k.startswith("quantize.")},
                                  "quantize.enabled": False}
        files = result.run_dir / sibling.user_attrs["files_in"]
        assert json.loads((files / "metrics.json").read_text())["metric"] == sibling.values[0]
        assert json.loads((files / "spec.json").read_text())["quantize"] == {"enabled": False}
        model, quantized_model = files / "model.onnx", result.run_dir / "trials" / f"{source.number:04d}" / "model.onnx"
        assert "QuantizeLinear" not in _op_types(model) and "QuantizeLinear" in _op_types(quantized_model)
        # the same trained weights: the int8 artifact's outputs are the sibling's within int8 error
        # (an untrained or differently fine-tuned model would be far off)
        fp32_out, int8_out = run_batches(model, val), run_batches(quantized_model, val)
        assert np.abs(int8_out - fp32_out).max() < 0.1 * np.abs(fp32_out).max()
        accuracy = float((fp32_out.argmax(1) == tiny_workload.val.targets.numpy()).mean())
        assert accuracy == pytest.approx(sibling.values[0])


def test_a_candidate_without_quantization_is_also_scored_with_it(tmp_path, registry, tiny_workload):
    """A trial with quantization off gets the sibling with every layer int8 (the anchors' setting);
    a resumed run counts only the trials of the budget, not the siblings."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=storage, study_name="autocomp",
                        directions=["maximize", "minimize"]).enqueue_trial({"quantize.enabled": False})
    result, study = _optional_method_search(tmp_path, registry, QUANTIZE_OPTIONAL, trials=1, storage=storage)
    source, sibling = study.trials
    assert sibling.user_attrs["sibling_of"] == 0 and sibling.user_attrs["added"] == "quantize"
    layers = {k: v for k, v in sibling.params.items() if k.startswith("quantize.") and k != "quantize.enabled"}
    assert sibling.params["quantize.enabled"] is True and layers and set(layers.values()) == {"int8"}
    assert result.summary["trials"] == {**result.summary["trials"], "total": 1, "siblings": 1}
    files = result.run_dir / sibling.user_attrs["files_in"]
    assert set(json.loads((files / "spec.json").read_text())["quantize"].values()) == {True, "int8"}
    # without --keep-all the model stays only for a Pareto member, which points at it
    members = {m["trial"]: m for m in result.pareto}
    assert (files / "model.onnx").exists() is (sibling.number in members)
    if sibling.number in members:
        assert members[sibling.number]["artifact"] == str(files / "model.onnx")
        assert members[sibling.number]["sibling_of"] == 0
    result, study = _optional_method_search(tmp_path, registry, QUANTIZE_OPTIONAL, trials=2, storage=storage,
                                            resume=True)
    assert sum("sibling_of" not in t.user_attrs for t in study.trials) == result.summary["trials"]["total"] == 2


def test_quantization_alone_in_a_joint_space_is_neither_fine_tuned_nor_given_the_base_model_as_sibling(
        tmp_path, registry, tiny_workload):
    """The first anchor of a space whose pruning can be 0 is quantization alone: the base model's
    structure, so no fine-tuning (it is quantization alone's candidate, not a retrained one), and
    neither a sibling nor a toggle without quantization (that would be the base model itself).
    The base model's structure without quantization still gets its sibling with it."""
    import optuna

    from autocomp.method import BaseModelInfo
    from autocomp.proposals import MethodToggles
    from autocomp.space import load_space

    space = ("[prune]\nratio = [0.0, 0.4]\nround_to = 8\n\n[distill]\ntemperature = [1.0, 8.0]\n"
             "alpha = [0.0, 0.9]\nsteps = 15\n\n[quantize]\noptional = true\nbits = [8, 32]\n")
    result, study = _optional_method_search(tmp_path, registry, space, trials=1)
    (trial,) = [t for t in study.trials if t.state.is_finished()]  # the other anchors wait
    assert trial.params["quantize.enabled"] is True
    unpruned = {k: v for k, v in trial.params.items() if k.startswith("prune.")}
    assert all(v == 0.0 for k, v in unpruned.items() if k != "prune.importance")
    notes = json.loads((result.run_dir / "trials" / "0000" / "metrics.json").read_text())["notes"]
    assert notes["structure_unchanged"] is True and "recovery_skipped" in notes
    assert "distill_steps" not in notes and "bn_recalibrated" not in notes
    (member,) = result.summary["pareto"]  # its spec still lists distillation: the notes say it did not run
    assert member["spec"]["distill"] and member["notes"] == notes
    assert result.summary["trials"]["siblings"] == 0
    concrete = load_space(tmp_path / "optional.toml", registry.methods).concrete(BaseModelInfo(
        tiny_workload.model, tiny_workload.example_input, result.run_dir / "baseline" / "model.onnx",
        registry.target("cpu")))
    assert concrete.builds_base_model({**trial.params, "quantize.enabled": False})
    toggles = MethodToggles(concrete, trials=40, share=1.0)
    assert toggles.post_export(trial.params) == []
    toggles(study, trial)  # the front member's toggle would leave quantization out: not queued
    assert not any("ablated" in t.user_attrs for t in study.get_trials(deepcopy=False))
    # the base model's structure at fp32 (a trial the user enqueued) gets quantization alone as its sibling
    storage = f"sqlite:///{tmp_path / 'fp32.db'}"
    optuna.create_study(storage=storage, study_name="autocomp", directions=["maximize", "minimize"]).enqueue_trial(
        {**unpruned, "quantize.enabled": False, "distill.temperature": 2.0, "distill.alpha": 0.5})
    result, study = _optional_method_search(tmp_path, registry, space, trials=1, storage=storage,
                                            out=tmp_path / "fp32")
    source, sibling = [t for t in study.trials if t.state.is_finished()]
    assert source.params["quantize.enabled"] is False and sibling.user_attrs["added"] == "quantize"
    assert sibling.user_attrs["sibling_of"] == source.number and result.summary["trials"]["siblings"] == 1


def test_a_stop_while_building_a_sibling_keeps_the_trained_trial(tmp_path, registry, tiny_workload, monkeypatch):
    """A stop (SIGTERM or Ctrl-C) that lands while a sibling is built ends the search after the
    trial, which is recorded complete; the resumed run goes on from there."""
    import optuna

    from autocomp.errors import Interrupted
    from autocomp.trial import Objective

    score = Objective._score

    def stop_at_the_sibling(self, trial, final, out_dir, ctx):
        if out_dir.name.startswith("sibling-"):
            raise KeyboardInterrupt
        return score(self, trial, final, out_dir, ctx)

    monkeypatch.setattr(Objective, "_score", stop_at_the_sibling)
    with pytest.raises(Interrupted):
        _optional_method_search(tmp_path, registry, QUANTIZE_OPTIONAL, trials=2)
    study = optuna.load_study(study_name="autocomp", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [t.state for t in study.trials if t.state.is_finished()] == [optuna.trial.TrialState.COMPLETE]
    monkeypatch.setattr(Objective, "_score", score)
    result, study = _optional_method_search(tmp_path, registry, QUANTIZE_OPTIONAL, trials=2, resume=True)
    assert result.summary["trials"]["complete"] == 2


def _objective(tmp_path, registry, **config):
    """The search's objective over the tiny workload, its base model said to score 0.9."""
    from autocomp.search import _StopOnSignal, prepare
    from autocomp.trial import Objective

    options = FAST_TIMING if config.get("target", "cpu") == "cpu" else {}
    prep = prepare(SearchConfig(workload="digits-tiny", target_options=options, out=tmp_path / "run",
                                **{"max_drop": 0.05, **config}), registry)
    prep.run.root.mkdir(parents=True)
    return Objective(prep, None, {"metric": 0.9, "latency_ms": 2.0}, lambda kind, data: None, _StopOnSignal(),
                     toggles=None)


def _study_with_front(*members):
    """A real study whose feasible front is ``members`` (metric, ms), next to an infeasible trial
    faster than all of them; returns a fresh trial asked of it."""
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (metric, ms, feasible) in enumerate([*(m + (True,) for m in members), (0.5, 0.01, False)]):
        study.add_trial(optuna.trial.create_trial(
            values=[metric, ms], params={"x": i}, distributions={"x": FloatDistribution(0, 10)},
            system_attrs={"constraints": [-1.0 if feasible else 1.0]}))
    return study.ask()


def test_a_reading_on_or_near_the_front_is_measured_again(tmp_path, registry, tiny_workload):
    """A feasible candidate whose reading puts it on the front, or misses the front by less than
    RECHECK_WITHIN (1.5x), gets a second window, and so does the most accurate one yet; one far off
    the front and one over the accuracy budget do not. Infeasible trials are not the front."""
    objective = _objective(tmp_path, registry)
    trial = _study_with_front((0.89, 1.0), (0.87, 0.5))
    assert objective._recheck_reason(trial, 0.88, 1.2) == "read 1.2 ms, missing 1 ms to join the front"
    assert objective._recheck_reason(trial, 0.86, 0.7) == "read 0.7 ms, missing 0.5 ms to join the front"
    assert objective._recheck_reason(trial, 0.88, 0.9) == "read 0.9 ms, within 1 ms to join the front"
    assert objective._recheck_reason(trial, 0.895, 5.0) == "read 5 ms, the most accurate candidate yet"
    assert objective._recheck_reason(trial, 0.88, 1.6) is None  # too far off to be a slowed window
    assert objective._recheck_reason(trial, 0.80, 0.6) is None  # over the accuracy budget


def test_a_reading_near_max_latency_is_measured_again(tmp_path, registry, tiny_workload):
    """The stricter of --max-latency and the front decides: a candidate more accurate than every
    member is rechecked against the bound; one the front already beats by far is not, whatever the
    bound."""
    objective = _objective(tmp_path, registry, max_latency_ms=1.0)
    trial = _study_with_front((0.89, 0.2))
    assert objective._recheck_reason(trial, 0.895, 1.3) == "read 1.3 ms, missing --max-latency 1 ms"
    assert objective._recheck_reason(trial, 0.895, 0.9) == "read 0.9 ms, within --max-latency 1 ms"
    assert objective._recheck_reason(trial, 0.895, 1.6) is None
    assert objective._recheck_reason(trial, 0.88, 1.3) is None  # over the bound, and the front is far faster
    assert objective._recheck_reason(trial, 0.88, 0.25) == "read 0.25 ms, missing 0.2 ms to join the front"


def test_a_predicted_target_is_never_measured_again(tmp_path, registry, tiny_workload):
    objective = _objective(tmp_path, registry, target="jetson")
    assert objective._recheck_reason(_study_with_front((0.89, 1.0)), 0.88, 1.2) is None


def _with_slow_first_window():
    """A registry with the cpu target, as ``cpu-slow-first``, whose first window of every model is
    slowed threefold, as a busy neighbour slows a whole window on a shared machine."""
    from autocomp.latency import graph_hash

    seen: set[str] = set()

    def factor(path):
        graph = graph_hash(path)
        first = graph not in seen
        seen.add(graph)
        return 3 if first else 1

    return _with_scaled_cpu_target("cpu-slow-first", factor)


def test_a_second_window_replaces_a_slowed_first_reading(tmp_path, tiny_workload, monkeypatch):
    """Every candidate (the decision forced; it is tested above) is measured twice; the search keeps
    the faster reading, says so in the trial's record, and caches it."""
    from autocomp.latency import LatencyCache, graph_hash, target_identity
    from autocomp.ort import input_shapes_of
    from autocomp.trial import Objective

    registry = _with_slow_first_window()
    monkeypatch.setattr(Objective, "_recheck_reason", lambda self, trial, metric, ms: "forced")
    space = tmp_path / "space.toml"
    space.write_text("[prune]\nratio = [0.1, 0.6]\nround_to = 2\n")  # two anchors, two models
    result = run_search(SearchConfig(workload="digits-tiny", target="cpu-slow-first", target_options=FAST_TIMING,
                                     space=space, max_drop=1.0, trials=2, out=tmp_path / "run", keep_all=True,
                                     final_rounds=0), registry)
    # the base model's three windows: the first slowed, the fastest kept
    windows = result.summary["baseline"]["latency_windows_ms"]
    assert len(windows) == 3 and result.summary["baseline"]["latency_ms"] == min(windows) < windows[0]
    cache = LatencyCache(result.run_dir / "latency_cache.sqlite")
    target = registry.target("cpu-slow-first").configure(FAST_TIMING)
    for number in (0, 1):
        metrics = json.loads((result.run_dir / "trials" / f"{number:04d}" / "metrics.json").read_text())
        rechecked = metrics["notes"]["latency_rechecked"]
        assert rechecked["why"] == "forced" and rechecked["second_ms"] < rechecked["first_ms"]
        assert metrics["latency_ms"] == rechecked["second_ms"]
        artifact = result.run_dir / "trials" / f"{number:04d}" / "model.onnx"
        key = cache.key(graph_hash(artifact), input_shapes_of(tiny_workload.example_input), target_identity(target))
        assert cache.get(key).min_ms == metrics["latency_ms"]


def test_the_same_candidate_written_two_ways_is_listed_once(tmp_path, registry, tiny_workload):
    """Quantization switched on at fp32 builds the model quantization switched off builds: with the
    same figures, the Pareto set lists it once, under its first trial, with the other in
    ``same_as``; a different candidate with the same figures is listed on its own."""
    import shutil

    import optuna
    from optuna.distributions import CategoricalDistribution

    from autocomp.export import export_onnx
    from autocomp.method import BaseModelInfo
    from autocomp.search import _summary, prepare

    space = tmp_path / "space.toml"
    space.write_text("[prune]\nratio = 0.3\nround_to = 8\n\n[quantize]\noptional = true\nbits = [8, 32]\nper_layer = false\n")
    prep = prepare(SearchConfig(workload="digits-tiny", target_options=FAST_TIMING, space=space, out=tmp_path / "run"),
                   registry)
    wl = prep.workload
    onnx_path = export_onnx(wl.model, wl.example_input, prep.run.baseline_dir / "model.onnx")
    concrete = prep.space.concrete(BaseModelInfo(wl.model, wl.example_input, onnx_path, prep.target))
    distributions = {"quantize.enabled": CategoricalDistribution((False, True)),
                     "quantize.all_layers": CategoricalDistribution(("fp32", "int8"))}
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, params in enumerate(({"quantize.enabled": False},
                                     {"quantize.enabled": True, "quantize.all_layers": "fp32"},
                                     {"quantize.enabled": True, "quantize.all_layers": "int8"})):
        study.add_trial(optuna.trial.create_trial(values=[0.9, 1.0], params=params,
                                                  distributions={k: distributions[k] for k in params}))
        trial_dir = prep.run.trial_dir(number)
        trial_dir.mkdir(parents=True)
        shutil.copy(onnx_path, trial_dir / "model.onnx")
        (trial_dir / "spec.json").write_text(json.dumps({"quantize": params}))
        (trial_dir / "metrics.json").write_text(json.dumps({"drop": 0.0, "latency_p50_ms": 1.1, "latency_p90_ms": 1.2,
                                                            "size_bytes": 1}))
    summary = _summary(prep, concrete, study, {"latency_ms": 2.0}, "complete")
    assert [(m["trial"], m.get("same_as")) for m in summary["pareto"]] == [(0, [1]), (2, None)]


def _run_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of run ``src``'s pareto.json in a new run directory, with top-level keys changed."""
    import shutil

    dst.mkdir(parents=True)
    shutil.copy(src / "run.json", dst / "run.json")
    summary = json.loads((src / "pareto.json").read_text())
    summary.update(run_dir=str(dst), **changes)
    (dst / "pareto.json").write_text(json.dumps(summary))
    return dst


def test_compare_keeps_a_run_against_itself_and_flags_a_lost_member(finished_run, tmp_path, capsys):
    _, _, result, _ = finished_run
    run = result.run_dir
    # a run keeps all of itself, even without tolerance (each member at least keeps itself)
    assert main(["compare", str(run), str(run), "--max-metric-loss", "0", "--max-slowdown", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    pareto = json.loads((run / "pareto.json").read_text())["pareto"]
    assert report["lost"] == 0 and [p["trial"] for p in report["points"]] == [m["trial"] for m in pareto]

    # the new run lacks the baseline's most accurate member: with no tolerance, that one is lost
    top = max(pareto, key=lambda m: m["metric"])
    rest = [m for m in pareto if m is not top]
    new = _run_copy(run, tmp_path / "new", pareto=rest)
    code = main(["compare", str(run), str(new), "--max-metric-loss", "0", "--max-slowdown", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 5 and report["regressed"] and report["lost"] == 1
    [lost] = [p for p in report["points"] if not p["kept"]]
    assert lost["trial"] == top["trial"]
    fast = [m["metric"] for m in rest if m.get("final_latency_ms", m["latency_ms"]) <= top.get("final_latency_ms", top["latency_ms"])]
    assert lost["shortfall"] == (top["metric"] - max(fast) if fast else None)
    # the other way round nothing is lost: every member of the smaller set is in the larger one
    assert main(["compare", str(new), str(run), "--max-metric-loss", "0", "--max-slowdown", "0"]) == 0
    # and a tolerance wide enough keeps the lost member too
    assert main(["compare", str(run), str(new), "--max-metric-loss", "1", "--max-slowdown", "9"]) == (0 if rest else 5)


def test_compare_refuses_runs_that_cannot_be_compared(finished_run, tmp_path, capsys):
    _, _, result, _ = finished_run
    run = result.run_dir
    other = _run_copy(run, tmp_path / "other", target={"name": "jetson-orin-nano", "measured": False})
    assert main(["compare", str(run), str(other)]) == 2
    assert "differ in target" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    unfinished = _run_copy(run, tmp_path / "unfinished", status="interrupted")
    assert main(["compare", str(run), str(unfinished)]) == 2
    assert "--resume" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert main(["compare", str(run), str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in " ".join(capsys.readouterr().err.split())  # rich wraps lines


def test_export_copies_the_member_a_rule_picks_with_its_model_card(finished_run, tiny_workload, tmp_path, capsys):
    from autocomp.results import reported_latency_ms

    _, _, result, _ = finished_run
    run = result.run_dir
    pareto = json.loads((run / "pareto.json").read_text())["pareto"]
    to = tmp_path / "deploy" / "digits.onnx"
    assert main(["export", str(run), "--to", str(to), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    fastest = min(pareto, key=lambda m: (reported_latency_ms(m), -m["metric"], m["trial"]))
    assert card["source"]["trial"] == fastest["trial"] and card["sha256"] == fastest["sha256"] == sha256_of(to)
    assert json.loads(to.with_suffix(".json").read_text()) == card
    assert card["spec"] == fastest["spec"] and card["versions"]["onnxruntime"] and card["target"]["name"] == "cpu"
    # the figures on the card are the exported file's own
    outputs = run_batches(to, tiny_workload.val.inputs.numpy())
    assert card["metric"] == pytest.approx(float(np.mean(outputs.argmax(1) == tiny_workload.val.targets.numpy())),
                                           abs=1e-12)
    # the most accurate member, into a directory, by name, written over what was there
    (tmp_path / "deploy" / "model.onnx").write_bytes(b"yesterday's model")
    assert main(["export", str(run), "--to", str(tmp_path / "deploy"), "--prefer", "most-accurate"]) == 0
    best = max(pareto, key=lambda m: (m["metric"], -reported_latency_ms(m), -m["trial"]))
    assert sha256_of(tmp_path / "deploy" / "model.onnx") == best["sha256"]
    assert f"trial {best['trial']}:" in capsys.readouterr().err
    for member in pareto:
        assert main(["export", str(run), "--to", str(tmp_path / f"t{member['trial']}.onnx"),
                     "--trial", str(member["trial"])]) == 0
        assert sha256_of(tmp_path / f"t{member['trial']}.onnx") == member["sha256"]


def test_export_refuses_what_it_cannot_hand_over_and_writes_nothing(finished_run, tmp_path, capsys):
    import shutil

    from autocomp.results import reported_latency_ms

    _, _, result, _ = finished_run
    moved = tmp_path / "moved"
    shutil.copytree(result.run_dir, moved)  # a run read where it lies now, not where it was written
    pareto = json.loads((moved / "pareto.json").read_text())["pareto"]
    fastest = min(pareto, key=lambda m: (reported_latency_ms(m), -m["metric"], m["trial"]))  # what it exports
    artifact = moved / Path(fastest["artifact"]).relative_to(result.run_dir)
    to = tmp_path / "out" / "m.onnx"
    assert main(["export", str(moved), "--to", str(to), "--json"]) == 0  # yesterday's export, kept below
    shipped, card = to.read_bytes(), to.with_suffix(".json").read_text()
    assert json.loads(capsys.readouterr().out)["source"]["artifact"] == str(artifact.resolve())
    assert main(["export", str(moved), "--to", str(to), "--max-latency", "1e-6"]) == 1
    assert "no Pareto member of" in " ".join(capsys.readouterr().err.split())
    trials = {m["trial"] for m in pareto}
    assert main(["export", str(moved), "--to", str(to), "--trial", str(max(trials) + 100)]) == 2
    assert "is not a Pareto member" in " ".join(capsys.readouterr().err.split())
    assert main(["export", str(moved), "--to", str(tmp_path / "m.bin")]) == 2
    assert "ending in .onnx" in " ".join(capsys.readouterr().err.split())
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    assert main(["export", str(moved), "--to", str(to)]) == 4
    assert "is not the file the run measured" in " ".join(capsys.readouterr().err.split())
    artifact.unlink()
    assert main(["export", str(moved), "--to", str(to)]) == 4
    assert "is missing" in " ".join(capsys.readouterr().err.split())
    assert main(["export", str(moved), "--to", str(tmp_path / "m.bin")]) == 2  # the usage error first
    # what was shipped before is still there, whole, and nothing half-written beside it
    assert to.read_bytes() == shipped and to.with_suffix(".json").read_text() == card
    assert sorted(p.name for p in to.parent.iterdir()) == ["m.json", "m.onnx"]


def test_the_search_writes_its_report_and_autocomp_report_writes_it_again(finished_run, tmp_path, capsys):
    import re
    from urllib.parse import unquote

    _, _, result, _ = finished_run
    run = result.run_dir
    page = (run / "report.html").read_text()
    pareto = json.loads((run / "pareto.json").read_text())
    for member in pareto["pareto"]:
        link = Path(member["artifact"]).relative_to(run).as_posix()
        assert f'id="trial-{member["trial"]}"' in page and f'href="{link}"' in page
    scored = [p for p in run.glob("trials/**/metrics.json") if json.loads(p.read_text())["status"] == "complete"]
    assert page.count('r="3.5"') == len(scored) > 0
    again = tmp_path / "pages" / "again.html"
    assert main(["report", str(run), "--out", str(again)]) == 0
    page = again.read_text()
    assert page.count('r="3.5"') == len(scored) and str(again) in "".join(capsys.readouterr().err.split())
    links = re.findall(r'href="([^"#]+)"', page)
    assert len(links) == len(pareto["pareto"]) + 1 and all((again.parent / unquote(link)).is_file() for link in links)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
