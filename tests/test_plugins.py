"""Plugin loading: entry points, duplicate names, misspelled hooks, plugins that fail to import."""

from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from autocomp import hookimpl, hookspecs
from autocomp.errors import PluginError
from autocomp.method import Method
from autocomp.plugins import load_registry

from .conftest import unmeasured_target


def _entry_point(name, package, load):
    return SimpleNamespace(name=name, dist=SimpleNamespace(name=package), load=load)


def _target_plugin(target_name, aliases=()):
    module = types.ModuleType(f"plugin_{target_name}")

    @hookimpl
    def register_targets(register):
        register(unmeasured_target(target_name, aliases=aliases))

    module.register_targets = register_targets
    return module


def test_builtin_entry_points_are_declared_and_load():
    """The installed package declares its built-ins through the `autocomp` group."""
    registry = load_registry()
    assert {"prune", "distill", "quantize"} <= set(registry.methods)
    assert "cpu" in registry.targets and "digits" in registry.workloads
    assert registry.sources[("method", "prune")] == "autocomp"


def test_duplicate_name_names_both_packages():
    eps = [_entry_point("a", "pkg-one", lambda: _target_plugin("board")),
           _entry_point("b", "pkg-two", lambda: _target_plugin("board"))]
    with pytest.raises(PluginError) as info:
        load_registry(entry_points=eps)
    assert "'board'" in str(info.value) and "pkg-one" in str(info.value) and "pkg-two" in str(info.value)


def test_alias_colliding_with_a_name_is_a_duplicate():
    eps = [_entry_point("a", "pkg-one", lambda: _target_plugin("board")),
           _entry_point("b", "pkg-two", lambda: _target_plugin("other", aliases=["board"]))]
    with pytest.raises(PluginError, match="pkg-one.*pkg-two"):
        load_registry(entry_points=eps)


def test_misspelled_hook_is_reported_with_a_hint_and_skipped():
    module = types.ModuleType("misspelled")

    @hookimpl
    def register_target(register):  # missing the final "s"
        raise AssertionError("must never be called")

    module.register_target = register_target
    eps = [_entry_point("bad", "pkg-bad", lambda: module), _entry_point("good", "pkg-good", lambda: _target_plugin("board"))]
    registry = load_registry(entry_points=eps)
    assert "board" in registry.targets
    [broken] = registry.broken
    assert broken.name == "bad" and broken.package == "pkg-bad"
    assert "register_target" in broken.reason and "register_targets" in broken.reason


def test_plugin_that_raises_on_import_is_reported_and_skipped(tmp_path, monkeypatch):
    (tmp_path / "exploding_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="exploding", value="exploding_plugin", group="autocomp")
    registry = load_registry(entry_points=[ep, _entry_point("good", "pkg-good", lambda: _target_plugin("board"))])
    assert "board" in registry.targets
    [broken] = registry.broken
    assert broken.name == "exploding" and "boom at import" in broken.reason
    sys.modules.pop("exploding_plugin", None)


def test_registration_hook_that_raises_is_reported_and_skipped():
    module = types.ModuleType("raising")

    @hookimpl
    def register_methods(register):
        raise ValueError("broken registration")

    module.register_methods = register_methods
    registry = load_registry(entry_points=[_entry_point("raising", "pkg-r", lambda: module)])
    assert [b.name for b in registry.broken] == ["raising"]
    assert "broken registration" in registry.broken[0].reason


def test_every_hook_has_a_test():
    """Meta-test: each hook in hookspecs.py is exercised by name somewhere in the tests."""
    from pathlib import Path

    hooks = [n for n in dir(hookspecs) if n.startswith("register_")]
    text = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = [h for h in hooks if f"def {h}(" not in text]
    assert hooks and not untested, f"hooks without a test plugin: {untested}"


def test_workload_registration_records_package():
    module = types.ModuleType("wl")

    @hookimpl
    def register_workloads(register):
        register("mine", lambda: None, "a workload")

    module.register_workloads = register_workloads
    registry = load_registry(entry_points=[_entry_point("wl", "pkg-wl", lambda: module)])
    assert registry.workloads["mine"].package == "pkg-wl"
    assert registry.workloads["mine"].description == "a workload"


@dataclass(frozen=True)
class _NoConfig:
    pass


@dataclass(frozen=True)
class _OptionalField:
    optional: bool = False


class _Noop(Method):
    name, stage, config_type = "noop", "structural", _NoConfig

    def parameters(self, config, base):
        return []

    def apply(self, model, setting, config, ctx):
        return model


def _stage(value):
    return type("BadStage", (_Noop,), {"stage": value})()


def _named(value):
    return type("BadName", (_Noop,), {"name": value})()


@pytest.mark.parametrize("hook, args, expected", [
    ("register_methods", lambda: (_Noop,), r"registered the class _Noop, not an instance: register _Noop\(\)"),
    ("register_methods", lambda: (_Noop(), _Noop()), r"called register with 2 argument\(s\)"),
    ("register_methods", lambda: (object(),), r"not an instance of autocomp.Method"),
    ("register_methods", lambda: (_stage("post-export"),), r"stage 'post-export'; use one of structural, recovery"),
    ("register_methods", lambda: (_named("my.method"),), r"named 'my.method': a name is a non-empty string"),
    ("register_methods", lambda: (type("NoDataclass", (_Noop,), {"config_type": dict})(),),
     r"config_type <class 'dict'>; it must be a dataclass"),
    ("register_methods", lambda: (type("Reserved", (_Noop,), {"config_type": _OptionalField})(),),
     r"config field named 'optional', which every space table keeps"),
    ("register_targets", lambda: (unmeasured_target("board", aliases=["my:board"]),), r"aliases .*'my:board'"),
    ("register_workloads", lambda: ("mine",), r"register\(name, factory, description=''\) wrongly"),
    ("register_workloads", lambda: ("mine", "not callable"), r"factory 'not callable', which is not callable"),
])
def test_a_malformed_registration_skips_its_plugin_with_the_reason(hook, args, expected):
    """Caught when plugins load and reported with the plugin, not as a crash deep in a search; the
    other plugins still load."""
    module = types.ModuleType("malformed")

    def register_hook(register):
        register(*args())

    setattr(module, hook, hookimpl(register_hook, specname=hook))
    registry = load_registry(entry_points=[_entry_point("malformed", "pkg-m", lambda: module),
                                           _entry_point("good", "pkg-good", lambda: _target_plugin("board2"))])
    [broken] = registry.broken
    assert broken.name == "malformed" and broken.package == "pkg-m"
    assert re.search(expected, broken.reason), broken.reason
    assert set(registry.targets) == {"board2"} and not registry.methods and not registry.workloads


def test_a_plugin_broken_in_one_hook_registers_nothing_from_its_others():
    """Its methods registered fine, its targets hook raised: none of it is kept (a half-loaded
    plugin would run with parts missing)."""
    module = types.ModuleType("half")
    module.register_methods = hookimpl(lambda register: register(_Noop()), specname="register_methods")

    @hookimpl
    def register_targets(register):
        raise RuntimeError("no board attached")

    module.register_targets = register_targets
    registry = load_registry(entry_points=[_entry_point("half", "pkg-h", lambda: module)])
    assert [b.name for b in registry.broken] == ["half"] and "no board attached" in registry.broken[0].reason
    assert "noop" not in registry.methods


def test_a_method_subclass_that_parses_its_own_table_needs_no_dataclass():
    """config_type need not be a dataclass when the method overrides parse_config."""
    class OwnParser(_Noop):
        config_type = dict

        def parse_config(self, table, source):
            return dict(table)

    module = types.ModuleType("own")
    module.register_methods = hookimpl(lambda register: register(OwnParser()), specname="register_methods")
    registry = load_registry(entry_points=[_entry_point("own", "pkg-o", lambda: module)])
    assert not registry.broken and "noop" in registry.methods


def _readme_method_example(monkeypatch) -> types.ModuleType:
    """The method plugin the README shows, as a module (the README's code, not a copy of it)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "class FactorizeHead" in block]
    module = types.ModuleType("readme_factorize_head")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # where dataclasses and typing look a class's module up
    exec(compile(code, "README.md", "exec"), module.__dict__)
    return module


def test_the_readme_method_example_runs_in_a_search(tmp_path, tiny_workload, monkeypatch):
    """The README's example plugin registers, its parameter is sampled, and the candidate it builds
    is trained back, exported and scored: the kept artifact has the head factorized in two layers."""
    import onnx

    from autocomp.search import SearchConfig, run_search

    from .conftest import FAST_TIMING, builtin_plugins

    example = _readme_method_example(monkeypatch)
    registry = load_registry(entry_points=[], extra_plugins=[*builtin_plugins(), ("head", example)])
    assert not registry.broken and registry.methods["factorize_head"].stage == "structural"
    space = tmp_path / "space.toml"
    space.write_text("[factorize_head]\nkeep = [0.25, 1.0]\n\n[distill]\nsteps = 5\n")
    result = run_search(SearchConfig(workload="digits-tiny", target_options=FAST_TIMING, space=space, max_drop=1.0,
                                     trials=2, out=tmp_path / "run", final_rounds=1, keep_all=True), registry)
    assert result.summary["trials"]["complete"] == 2
    first = tmp_path / "run" / "trials" / "0000"
    # the first anchor: the rank ratio half way from its neutral end, 0.625 of the head's rank 10
    assert json.loads((first / "spec.json").read_text())["factorize_head"] == {"keep": 0.625}
    layers = [n.op_type for n in onnx.load(first / "model.onnx").graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(layers) == 2, layers


def test_the_readme_conformance_example_passes_the_readme_method(tmp_path, monkeypatch, torch_threads):
    """The README's autocomp.testing example, run on the README's method; the report shows the head
    factorized on every architecture that has one (fc or head), and left alone elsewhere."""
    from pathlib import Path

    example = _readme_method_example(monkeypatch)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "check_method(" in block]
    exec(compile(code, "README.md", "exec"), example.__dict__)
    reports = []
    monkeypatch.setattr(example, "check_method", lambda *a, **k: reports.append(check(*a, **k)) or reports[-1])
    from autocomp.testing import check_method as check

    example.test_factorize_head_conforms(tmp_path)
    [report] = reports
    assert not report.failures and report.passed > 50
    costs = {f.where: f.detail for f in report.findings if f.check == "cost against the base model"}
    assert set(costs) == {f"{a} / strongest" for a in ("resnet20", "mobilenet_v2", "vit", "mobilefacenet")}
    assert "parameters x1.000" in costs["mobilenet_v2 / strongest"]  # its classifier is not named fc
    assert "parameters x1.000" not in costs["resnet20 / strongest"]


@pytest.mark.parametrize("which, expected", [
    ("train", r"training inputs have shape \(4,\) per example but example_input has \(8,\)"),
    ("test", r"test inputs have shape \(4,\) per example"),
    ("val", r"validation inputs have shape \(4,\) per example"),
])
def test_a_workload_split_of_another_shape_is_refused_naming_the_split(which, expected):
    """Every split is checked against example_input when the workload is made, not only the
    validation split: a mismatched training split would fail every candidate's fine-tuning."""
    import torch

    from autocomp import Split, Workload
    from autocomp.errors import WorkloadError

    good, bad = Split(torch.zeros(3, 8), torch.zeros(3)), Split(torch.zeros(3, 4), torch.zeros(3))
    splits = {"train": good, "val": good, "test": good, which: bad}
    with pytest.raises(WorkloadError, match=r"workload 'mine': " + expected):
        Workload(name="mine", model=torch.nn.Linear(8, 2), example_input=torch.zeros(1, 8), **splits)
    with pytest.raises(WorkloadError, match=r"the training split must be an autocomp.Split\(inputs, targets\), got None"):
        Workload(name="mine", model=torch.nn.Linear(8, 2), example_input=torch.zeros(1, 8), train=None, val=good)
    with pytest.raises(WorkloadError, match=r"the test split must be an autocomp.Split\(inputs, targets\), got tuple"):
        Workload(name="mine", model=torch.nn.Linear(8, 2), example_input=torch.zeros(1, 8), train=good, val=good,
                 test=(torch.zeros(3, 8), torch.zeros(3)))
