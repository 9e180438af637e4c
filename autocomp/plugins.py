"""The plugin manager: entry-point discovery (once, lazily), validation, and the registries.

Built-in plugins (the ``autocomp_plugins`` package) are found through the same entry-point group,
``autocomp``, as any third party's. A plugin that fails to import, declares a hook autocomp
does not have, raises in a hook or registers something malformed (a class instead of an instance, an
unknown stage, a name with a dot) is reported and skipped whole; two plugins registering one name is
an error naming both.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from autocomp import hookspecs
from autocomp.errors import PluginError, TargetError

__all__ = ["Registry", "BrokenPlugin", "get_registry", "load_registry", "reset_registry"]

logger = logging.getLogger("autocomp")

ENTRY_POINT_GROUP = "autocomp"


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    package: str
    reason: str


@dataclass(frozen=True)
class WorkloadEntry:
    name: str
    factory: Callable[[], Any]
    description: str
    package: str


@dataclass
class Registry:
    """What the loaded plugins provide, and which package provided each name."""

    methods: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)  # canonical name -> Target
    target_aliases: dict[str, str] = field(default_factory=dict)  # alias -> canonical name
    workloads: dict[str, WorkloadEntry] = field(default_factory=dict)
    sources: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> package
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> package
    broken: list[BrokenPlugin] = field(default_factory=list)

    def target(self, name: str) -> Any:
        """The target called ``name`` (or one of its aliases); :class:`TargetError` if none."""
        canonical = self.target_aliases.get(name, name)
        if canonical not in self.targets:
            known = sorted(set(self.targets) | set(self.target_aliases))
            hint = difflib.get_close_matches(name, known, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise TargetError(
                f"unknown target {name!r}{did_you_mean}; available: {', '.join(known)}. "
                "`autocomp targets` lists them"
            )
        return self.targets[canonical]

    def method(self, name: str) -> Any:
        return self.methods[name]


def _package_of(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def _check_hooks(pm: pluggy.PluginManager, plugin: Any, plugin_name: str) -> None:
    """Raise PluginError when ``plugin`` implements a hook name autocomp does not define."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = [n for n in dir(hookspecs) if n.startswith("register_")]
        unknown = [
            n for n in dir(plugin)
            if n.startswith("register") and n not in known and callable(getattr(plugin, n, None))
        ]
        hint = ""
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginError(f"plugin {plugin_name!r}: {exc}{hint}") from exc


def load_registry(entry_points: Iterable[metadata.EntryPoint] | None = None,
                  extra_plugins: Iterable[tuple[str, Any]] = ()) -> Registry:
    """Load plugins and collect what they register.

    ``entry_points`` defaults to the installed ``autocomp`` group; ``extra_plugins`` are
    ``(name, module_or_object)`` pairs registered directly (tests use this instead of whatever
    happens to be installed).
    """
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    registry = Registry()
    pm = pluggy.PluginManager("autocomp")
    pm.add_hookspecs(hookspecs)

    candidates: list[tuple[str, str, Callable[[], Any]]] = [
        (ep.name, _package_of(ep), ep.load) for ep in entry_points
    ]
    candidates += [(name, "<direct>", (lambda obj=obj: obj)) for name, obj in extra_plugins]

    for name, package, load in candidates:
        try:
            plugin = load()
        except Exception as exc:  # a third party's bug must not take the engine down
            reason = f"failed to import: {type(exc).__name__}: {exc}"
            logger.warning("plugin %r from %s skipped: %s", name, package, reason)
            registry.broken.append(BrokenPlugin(name, package, reason))
            continue
        try:
            pm.register(plugin, name=name)
            _check_hooks(pm, plugin, name)
        except (pluggy.PluginValidationError, PluginError, ValueError) as exc:
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            reason = str(exc)
            logger.warning("plugin %r from %s skipped: %s", name, package, reason)
            registry.broken.append(BrokenPlugin(name, package, reason))
            continue
        registry.plugins[name] = package

    def owner(kind: str, key: str, package: str) -> None:
        previous = registry.sources.get((kind, key))
        if previous is not None:
            raise PluginError(
                f"{kind} name {key!r} is registered twice: by package {previous!r} and by package "
                f"{package!r}; uninstall one of them or ask its author to rename it"
            )
        registry.sources[(kind, key)] = package

    def add_method(package: str, method: Any) -> None:
        owner("method", method.name, package)
        registry.methods[method.name] = method

    def add_target(package: str, target: Any) -> None:
        for key in (target.name, *target.aliases):
            owner("target", key, package)
        registry.targets[target.name] = target
        for alias in target.aliases:
            registry.target_aliases[alias] = target.name

    def add_workload(package: str, name: str, factory: Callable[[], Any], description: str = "") -> None:
        owner("workload", name, package)
        registry.workloads[name] = WorkloadEntry(name, factory, description, package)

    # Every hook of every plugin is called and what it registers checked before anything is added, so
    # a plugin that raises, or registers something malformed, in any of its hooks registers nothing.
    failed: set[str] = set()
    staged: list[tuple[str, Callable[..., None], tuple, dict]] = []
    for hook, add in ((pm.hook.register_methods, add_method), (pm.hook.register_targets, add_target),
                      (pm.hook.register_workloads, add_workload)):
        for impl in hook.get_hookimpls():
            if impl.plugin_name in failed:
                continue
            calls: list[tuple[tuple, dict]] = []
            try:
                impl.function(register=lambda *args, **kwargs: calls.append((args, kwargs)))
                reason = next((r for args, kwargs in calls if (r := _malformed(hook.name, args, kwargs))), None)
            except Exception as exc:
                reason = f"{hook.name} raised {type(exc).__name__}: {exc}"
            if reason is not None:
                package = registry.plugins.get(impl.plugin_name, "?")
                logger.warning("plugin %r from %s skipped: %s", impl.plugin_name, package, reason)
                registry.broken.append(BrokenPlugin(impl.plugin_name, package, reason))
                failed.add(impl.plugin_name)
                continue
            staged += [(impl.plugin_name, add, args, kwargs) for args, kwargs in calls]
    for plugin_name, add, args, kwargs in staged:
        if plugin_name not in failed:
            add(registry.plugins.get(plugin_name, "?"), *args, **kwargs)

    return registry


def _malformed(hook: str, args: tuple, kwargs: dict) -> str | None:
    """Why one ``register(...)`` call of ``hook`` cannot be taken, or None: caught when plugins load,
    so a malformed registration is reported with its plugin instead of failing deep in a search."""
    from autocomp.method import STAGES, Method
    from autocomp.target import Target

    spec = {"register_methods": (Method, "register(method)"), "register_targets": (Target, "register(target)")}
    if hook == "register_workloads":
        try:
            bound = inspect.signature(lambda name, factory, description="": None).bind(*args, **kwargs)
        except TypeError as exc:
            return f"{hook} called register(name, factory, description='') wrongly: {exc}"
        name, factory = bound.arguments["name"], bound.arguments["factory"]
        if not _is_name(name):
            return f"{hook} registered a workload named {name!r}: {_NAME_RULE}"
        if not callable(factory):
            return f"{hook} registered workload {name!r} with factory {factory!r}, which is not callable"
        return None
    base, call = spec[hook]
    kind = base.__name__
    if len(args) != 1 or kwargs:
        return (f"{hook} called register with {len(args)} argument(s) and {sorted(kwargs) or 'no'} keyword(s): "
                f"use {call}")
    obj = args[0]
    if isinstance(obj, type) and issubclass(obj, base):
        return f"{hook} registered the class {obj.__name__}, not an instance: register {obj.__name__}()"
    if not isinstance(obj, base):
        return f"{hook} registered {obj!r}, which is not an instance of autocomp.{kind} (subclass it)"
    name = getattr(obj, "name", None)
    if not _is_name(name):
        return f"{hook} registered a {kind} named {name!r}: {_NAME_RULE}"
    if base is Method:
        if getattr(obj, "stage", None) not in STAGES:
            return f"method {name!r} has stage {getattr(obj, 'stage', None)!r}; use one of {', '.join(STAGES)}"
        config_type = getattr(obj, "config_type", None)
        parses_itself = type(obj).parse_config is not Method.parse_config
        if not parses_itself and not (isinstance(config_type, type) and dataclasses.is_dataclass(config_type)):
            return (f"method {name!r} has config_type {config_type!r}; it must be a dataclass whose fields are "
                    "the keys of the method's table in a search-space file (or the method overrides parse_config)")
        if not parses_itself and "optional" in {f.name for f in dataclasses.fields(config_type)}:
            return (f"method {name!r} has a config field named 'optional', which every space table keeps for "
                    "'optional = true' (the search may leave the method out): rename the field")
    elif not all(_is_name(alias) for alias in getattr(obj, "aliases", ())):
        return f"target {name!r} has aliases {getattr(obj, 'aliases', ())!r}: {_NAME_RULE}, and so is an alias"
    return None


#: What :func:`_is_name` accepts, as the messages say it.
_NAME_RULE = "a name is a non-empty string without '.', ':' or spaces at its ends"


def _is_name(value: Any) -> bool:
    """A method, target or workload name: it names a search-space table, a study parameter's prefix
    (``<method>.<parameter>``) or a ``--workload``, where ``module:function`` means a user's factory."""
    return isinstance(value, str) and value.strip() == value and bool(value) and not set(value) & {".", ":"}


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Forget the loaded registry (or install ``registry``); for tests and embedding."""
    global _registry
    _registry = registry
