"""Search-space files: TOML -> a typed, validated space; sampling it through an Optuna trial.

A space file has one table per method, keyed by the method's name; each method validates its own
table (:meth:`autocomp.method.Method.parse_config`). The concrete parameters depend on the model
(one pruning ratio per prunable group, one precision per quantizable layer ...), so a
:class:`SearchSpace` is turned into :class:`ConcreteSpace` once the base model is known.
"""

from __future__ import annotations

import difflib
import logging
import math
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from autocomp.errors import SpaceError
from autocomp.method import STAGES, BaseModelInfo, ChoiceParam, FixedParam, FloatParam, IntParam, Method, Param

if TYPE_CHECKING:
    import optuna

__all__ = ["SearchSpace", "ConcreteSpace", "CandidateSpec", "load_space", "default_space_path", "GATE", "same_value"]

logger = logging.getLogger("autocomp")

#: Name of the on/off parameter of a method marked ``optional = true`` in a space file. When it
#: samples ``False`` the method is not applied and none of its other parameters are sampled.
GATE = "enabled"


def default_space_path() -> Path:
    """The shipped default space (``search_spaces/default.toml`` beside the package)."""
    return Path(__file__).resolve().parent.parent / "search_spaces" / "default.toml"


@dataclass(frozen=True)
class SearchSpace:
    """A validated space file: the methods it enables, in stage order, with their configs."""

    source: str
    methods: tuple[tuple[Method, Any], ...]  # (method, its parsed config)
    text: str = ""
    #: Methods the search may also leave out (``optional = true``): they get a :data:`GATE` parameter.
    optional: frozenset[str] = frozenset()

    def names(self) -> list[str]:
        return [m.name for m, _ in self.methods]

    def concrete(self, base: BaseModelInfo) -> "ConcreteSpace":
        params: list[tuple[Method, Any, tuple[Param, ...]]] = []
        earlier: set[str] = set()  # full names of the parameters declared so far, which only_if may name
        for method, config in self.methods:
            declared = tuple(method.parameters(config, base))
            if method.name in self.optional:
                earlier.add(f"{method.name}.{GATE}")  # sampled before the method's own parameters
            seen: set[str] = set()
            for p in declared:
                if not isinstance(p, Param):
                    raise SpaceError(f"method declared {p!r}, which is not a parameter (FloatParam, IntParam, "
                                     "ChoiceParam or FixedParam from autocomp.method): a bug in the plugin that "
                                     "provides it", key=method.name)
                if p.name in seen:
                    raise SpaceError(f"method declared parameter {p.name!r} twice", key=method.name)
                if problem := _malformed_param(p, earlier):
                    raise SpaceError(f"method's parameter {p.name!r} {problem}: a bug in the plugin that provides "
                                     "it", key=method.name)
                seen.add(p.name)
                earlier.add(f"{method.name}.{p.name}")
            if method.name in self.optional:
                if GATE in seen:
                    raise SpaceError(f"method has a parameter named {GATE!r}, which 'optional = true' needs for its "
                                     "on/off choice; drop 'optional' from this table", source=self.source,
                                     key=method.name)
                declared = (ChoiceParam(GATE, (False, True), neutral=False),) + declared
            params.append((method, config, declared))
        return ConcreteSpace(tuple(params), gated=frozenset(self.optional))


@dataclass(frozen=True)
class CandidateSpec:
    """The sampled setting of every method, as ``{method: {param: value}}``; JSON-friendly."""

    settings: Mapping[str, Mapping[str, Any]]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {m: dict(s) for m, s in self.settings.items()}

    def flat(self) -> dict[str, Any]:
        return {f"{m}.{k}": v for m, s in self.settings.items() for k, v in s.items()}


@dataclass(frozen=True)
class ConcreteSpace:
    """The parameters of every method for one base model."""

    entries: tuple[tuple[Method, Any, tuple[Param, ...]], ...]
    #: Methods whose first parameter is the :data:`GATE` on/off choice (``optional = true``).
    gated: frozenset[str] = frozenset()

    def size(self) -> int:
        return sum(len(p) for _, _, p in self.entries)

    def rows(self) -> list[dict[str, Any]]:
        """One row per parameter, for ``autocomp space show``."""
        rows = []
        for method, _, params in self.entries:
            gate = (f"{method.name}.{GATE}", True) if method.name in self.gated else None
            for p in params:
                only_if = p.only_if or (gate if p.name != GATE else None)
                rows.append({"method": method.name, "stage": method.stage, "name": p.name,
                             "kind": type(p).__name__.removesuffix("Param").lower(),
                             "values": _describe(p), "only_if": only_if, "module": p.module,
                             "removes": p.removes})
        return rows

    def sample(self, trial: "optuna.trial.Trial") -> CandidateSpec:
        """Sample every parameter through ``trial`` (names ``<method>.<param>``)."""

        def suggest(key: str, p: Param) -> Any:
            if (fixed := _fixed_value(p)) is not _UNKNOWN:
                return fixed
            if isinstance(p, FloatParam):
                return trial.suggest_float(key, p.low, p.high, step=p.step)
            if isinstance(p, IntParam):
                return trial.suggest_int(key, p.low, p.high, step=p.step)
            assert isinstance(p, ChoiceParam)
            return trial.suggest_categorical(key, list(p.choices))

        return self._walk(suggest)

    def sampled_part(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The part of ``params`` (full names) a trial that took these values would sample: by the
        rules of :meth:`sample`, without a parameter of a module an earlier one removes, one whose
        ``only_if`` does not hold, or one of a method switched off. A parameter missing from
        ``params`` is left out, and so is one whose ``only_if`` names it; a missing gate or removal
        switches nothing off."""
        return self._walk(lambda key, p: params.get(key, _UNKNOWN)).flat()

    def canonical(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` (full names, possibly a partial setting) in the form that says which candidate
        they build: only what :meth:`sampled_part` keeps, with the values a trial never samples (a
        fixed parameter) filled in, each method's complete setting in its
        :meth:`~autocomp.method.Method.canonical` form, and an optional method switched on but
        changing nothing (:meth:`~autocomp.method.Method.changes_nothing`: quantization at fp32
        everywhere) written as switched off, which builds the same model. Where the structure is the
        base model's (:meth:`structure_unchanged`) no recovery method runs
        (:func:`autocomp.candidate.recover`): each is written as switched off, without a setting.
        Otherwise a method whose setting ``params`` leaves partly to the sampler is kept as written. A name this
        space does not declare is kept as it is. Two settings build the same candidate when their
        canonical forms are equal."""
        return self._canonical(params)[0]

    def structure_unchanged(self, params: Mapping[str, Any]) -> bool:
        """Whether the structural methods leave the base model as it is with ``params``: each one
        switched off, or with a complete setting its :meth:`~autocomp.method.Method.changes_nothing`
        says changes nothing (every pruning ratio 0, no block removed, full rank). Such a candidate
        is neither batch-norm re-estimated nor fine-tuned."""
        return self._all_change_nothing(self._canonical(params)[1], ("structural",))

    def builds_base_model(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` build the base model itself: the structure unchanged
        (:meth:`structure_unchanged`) and every post-export method off or changing nothing."""
        return self._all_change_nothing(self._canonical(params)[1], ("structural", "post_export"))

    def _all_change_nothing(self, nothing: Mapping[str, bool], stages: tuple[str, ...]) -> bool:
        """Whether every method of ``stages`` changes nothing, by the flags of :meth:`_canonical`."""
        return all(nothing[m.name] for m, _, _ in self.entries if m.stage in stages)

    def _canonical(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
        """The :meth:`canonical` form of ``params``, and for each method whether it is known to
        change nothing (switched off, or a complete setting its ``changes_nothing`` accepts)."""
        incomplete: set[str] = set()

        def value_of(key: str, p: Param) -> Any:
            if key in params:
                return params[key]
            if (fixed := _fixed_value(p)) is not _UNKNOWN:
                return fixed
            incomplete.add(key.split(".", 1)[0])
            return _UNKNOWN

        spec = self._walk(value_of)
        settings: dict[str, tuple[Any, dict[str, Any]]] = {}  # method -> (its gate, its setting)
        nothing: dict[str, bool] = {}
        for method, config, _ in self.entries:
            own = dict(spec.settings.get(method.name, {}))
            gate = own.pop(GATE, None)
            nothing[method.name] = gate is False
            if method.name not in incomplete:
                try:
                    own = dict(method.canonical(own, config))
                    if gate is not False and method.changes_nothing(own, config):
                        nothing[method.name] = True
                        if gate is True:
                            own, gate = {}, False
                except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the search
                    logger.warning("method %r: canonical form of %s failed (%s: %s); taken as written",
                                   method.name, own, type(exc).__name__, exc)
            settings[method.name] = (gate, own)
        unchanged = self._all_change_nothing(nothing, ("structural",))
        out: dict[str, Any] = {}
        for method, _, _ in self.entries:
            gate, own = settings[method.name]
            if unchanged and method.stage == "recovery":
                own, gate = {}, (None if gate is None else False)
            if gate is not None:
                out[f"{method.name}.{GATE}"] = gate
            out.update({f"{method.name}.{k}": v for k, v in own.items()})
        out.update({k: v for k, v in params.items() if k not in self.declared_names})
        return out, nothing

    @cached_property
    def declared_names(self) -> frozenset[str]:
        """The full names (``<method>.<param>``) of every parameter this space declares."""
        return frozenset(f"{method.name}.{p.name}" for method, _, params in self.entries for p in params)

    def _walk(self, value_of: Callable[[str, Param], Any]) -> CandidateSpec:
        """Every parameter a trial samples, in order, each given the value ``value_of(key, param)``
        (:data:`_UNKNOWN`: leave it out); the one place that says which parameters a trial samples."""
        taken: dict[str, Any] = {}
        removed: list[str] = []
        settings: dict[str, dict[str, Any]] = {}
        for method, _, params in self.entries:
            values: dict[str, Any] = {}
            for p in params:
                key = f"{method.name}.{p.name}"
                if p.only_if is not None and taken.get(p.only_if[0]) != p.only_if[1]:
                    continue
                if inside(p.module, removed):
                    continue
                v = value_of(key, p)
                if v is _UNKNOWN:
                    continue
                values[p.name] = v
                taken[key] = v
                if p.name == GATE and method.name in self.gated and v is False:
                    break  # the method is left out: none of its other parameters are sampled
                if p.removes is not None and v is True:
                    removed.append(p.removes)
            settings[method.name] = values
        return CandidateSpec(settings)


#: A value :meth:`ConcreteSpace.sampled_part` does not know.
_UNKNOWN = object()


def _malformed_param(p: Param, earlier: set[str]) -> str | None:
    """What is wrong with the parameter ``p`` a method declared, or None; ``earlier``: the full names
    of the parameters declared before it, the only ones its ``only_if`` can name (a parameter is
    sampled after those, so naming a later one, or a misspelled one, would silently never sample it)."""
    if not isinstance(p.name, str) or not p.name:
        return "has no name (a non-empty string)"
    if p.only_if is not None:
        if not (isinstance(p.only_if, tuple) and len(p.only_if) == 2):
            return f"has only_if={p.only_if!r}; it is a pair (full name of another parameter, value)"
        if p.only_if[0] not in earlier:
            close = difflib.get_close_matches(str(p.only_if[0]), sorted(earlier), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return (f"has only_if naming {p.only_if[0]!r}, which is not a parameter declared before it (a full name, "
                    f"<method>.<parameter>){hint}")
    if isinstance(p, (FloatParam, IntParam)):
        if not p.low <= p.high:
            return f"has low={p.low!r} > high={p.high!r}"
        if p.step is not None and not p.step > 0:
            return f"has step={p.step!r}; a step is positive"
        if p.neutral is not None and p.neutral not in (p.low, p.high):
            return f"has neutral={p.neutral!r}; a range's neutral value is one of its ends ({p.low!r}, {p.high!r})"
    elif isinstance(p, ChoiceParam):
        if not isinstance(p.choices, (tuple, list)) or not p.choices:
            return f"has choices={p.choices!r}; choices are a non-empty tuple"
        if p.neutral is not None and p.neutral not in p.choices:
            return f"has neutral={p.neutral!r}, which is not one of its choices {p.choices!r}"
    return None


def _fixed_value(p: Param) -> Any:
    """The value of a parameter a trial never asks the sampler for (a fixed value, a range of one
    value, a single choice), or :data:`_UNKNOWN`."""
    if isinstance(p, (FloatParam, IntParam)):
        return p.low if p.low == p.high else _UNKNOWN
    if isinstance(p, ChoiceParam):
        return p.choices[0] if len(p.choices) == 1 else _UNKNOWN
    return p.value


def same_value(a: Any, b: Any) -> bool:
    """Equality of parameter values, floats to within 1e-9 (a value on a float grid may come back
    from the storage as 0.30000000000000004)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9)
    return a == b


def inside(module: str | None, removed: list[str]) -> bool:
    """Whether ``module`` (a dotted path) is one of the ``removed`` modules or lies inside one."""
    return module is not None and any(module == r or module.startswith(r + ".") for r in removed)


def _describe(p: Param) -> str:
    if isinstance(p, (FloatParam, IntParam)):
        return f"[{p.low}, {p.high}]" + (f" step {p.step}" if isinstance(p, FloatParam) and p.step else "")
    if isinstance(p, ChoiceParam):
        return " | ".join(map(str, p.choices))
    assert isinstance(p, FixedParam)
    return repr(p.value)


def load_space(path: Path, methods: Mapping[str, Method]) -> SearchSpace:
    """Read and validate the space file at ``path`` against the registered ``methods``.

    Raises :class:`SpaceError` naming the file, the key and what is allowed.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError("file not found; give an existing TOML file to --space", source=source) from None
    except OSError as exc:
        raise SpaceError(f"cannot read the file: {exc}", source=source) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpaceError(f"not valid TOML: {exc}", source=source) from exc
    return parse_space(data, methods, source=source, text=text)


def parse_space(data: Mapping[str, Any], methods: Mapping[str, Method], *, source: str, text: str = "") -> SearchSpace:
    unknown = sorted(set(data) - set(methods))
    if unknown:
        raise SpaceError(
            f"unknown method(s) {', '.join(unknown)}; installed methods: {', '.join(sorted(methods))}",
            source=source,
        )
    if not data:
        raise SpaceError("the space enables no method; add at least one table such as [prune]", source=source)
    parsed = []
    optional = set()
    for name, table in data.items():
        method = methods[name]
        if not isinstance(table, Mapping):
            raise SpaceError(f"must be a table ([{name}]), got {table!r}", source=source, key=name)
        table = dict(table)
        flag = table.pop("optional", False)
        if not isinstance(flag, bool):
            raise SpaceError(f"must be true or false, got {flag!r}", source=source, key=f"{name}.optional")
        if flag:
            optional.add(name)
        parsed.append((method, method.parse_config(table, source)))
    parsed.sort(key=lambda mc: (STAGES.index(mc[0].stage), mc[0].order, mc[0].name))
    recovery = [m.name for m, _ in parsed if m.stage == "recovery"]
    if recovery and not any(m.stage == "structural" for m, _ in parsed):
        logger.warning("%s: [%s] never runs: recovery trains back what a structural method (prune, remove_blocks, "
                       "lowrank ...) changed, and this space has none", source, "], [".join(recovery))
    return SearchSpace(source=source, methods=tuple(parsed), text=text, optional=frozenset(optional))
