"""Plugin loading: entry points, duplicate names, misspelled hooks, plugins that fail to import."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from autocomp import hookimpl, hookspecs
from autocomp.errors import PluginError
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
