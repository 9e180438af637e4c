"""What a compression method is, and the typed parameters it adds to the search space.

A method plugin subclasses :class:`Method`, sets ``name``, ``stage`` and ``config_type`` (a frozen
dataclass whose fields are the keys of its search-space table), and implements
:meth:`Method.parameters` and :meth:`Method.apply`.

Stages run in this order for every candidate:

1. ``structural``: changes the torch model's structure (remove blocks, prune channels, factorize).
   ``apply(model, setting, config, ctx) -> model``; the model is already a private copy, and a
   method that changes it in place still returns it.
2. ``recovery``: trains the structurally changed model back (distillation, fine-tuning); it runs
   only when a structural method changed the model (:meth:`Method.changes_nothing`).
   ``apply(model, setting, config, ctx) -> model``. A method that changes weights but not the
   structure (weight clustering, masking) would see its changes trained away here: make it
   ``post_export``, on the ONNX file, where nothing trains after it.
3. ``post_export``: works on the exported ONNX file (quantization).
   ``apply(onnx_path, setting, config, ctx) -> new_onnx_path``: write new files under
   ``ctx.work_dir`` and leave ``onnx_path`` as it is. The graph has one input, named ``input``,
   with a dynamic batch dimension. It may run twice for one candidate: with ``--max-latency`` on a
   target that predicts latency, once on the untrained structure first, to reject a candidate that
   cannot meet the bound before it is trained.

``setting`` maps the method's parameter names (without the ``<method>.`` prefix) to the values the
trial sampled; ``config`` is the method's parsed table of the space file (``config_type``). What
``apply`` returns is checked: a model, or the path of a file that exists. An exception fails the
trial, not the search (raise :class:`autocomp.errors.CandidateError` with the reason), and parts
the method leaves alone go to ``ctx.skip``, listed in the run's summary.
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

from autocomp.errors import SpaceError

if TYPE_CHECKING:
    import torch

    from autocomp.target import Target
    from autocomp.workload import Workload

__all__ = [
    "EVALUATION_ARTIFACT",
    "Stage",
    "STAGES",
    "FloatParam",
    "IntParam",
    "ChoiceParam",
    "FixedParam",
    "Param",
    "strongest_value",
    "BaseModelInfo",
    "CandidateContext",
    "Method",
    "parse_range",
]

#: ``ctx.notes`` key a post-export method sets to the path of an evaluation twin: a file with the
#: artifact's numerics that this host can run, used for the metric when the artifact itself cannot be
#: evaluated faithfully here (fp16 layers on a CPU without fp16 kernels).
EVALUATION_ARTIFACT = "evaluation_artifact"

Stage = Literal["structural", "recovery", "post_export"]
STAGES: tuple[Stage, ...] = ("structural", "recovery", "post_export")


@dataclass(frozen=True)
class _ParamBase:
    #: Name within the method; the study sees ``<method>.<name>``.
    name: str
    #: Sample this parameter only when another parameter took the given value: ``(full name, value)``,
    #: e.g. ``("prune.scope", "group")``. That parameter must be declared before this one (by this
    #: method or an earlier one): the space refuses any other name.
    only_if: tuple[str, Any] | None = field(default=None, kw_only=True)
    #: The module (dotted path in the base model) this parameter concerns. It is not sampled when
    #: an earlier parameter removed that module or one of its parents.
    module: str | None = field(default=None, kw_only=True)
    #: For a parameter that removes a module when it takes the value ``True``: that module's path.
    removes: str | None = field(default=None, kw_only=True)
    #: The value that compresses least (for a range, one of its ends; for a choice, one of the
    #: choices), when the parameter has a direction: a pruning ratio's low end, a rank ratio's high
    #: end, ``False`` for a block removal, the highest precision offered. The search's anchor trials
    #: move away from it; ``None`` for parameters with no direction (a temperature, an importance).
    #: For a choice the anchors take the end of ``choices`` away from the neutral one (the last, or
    #: the first when the neutral one is last): list choices from least to most compression.
    neutral: Any = field(default=None, kw_only=True)


@dataclass(frozen=True)
class FloatParam(_ParamBase):
    low: float
    high: float
    step: float | None = None


@dataclass(frozen=True)
class IntParam(_ParamBase):
    low: int
    high: int
    step: int = 1


@dataclass(frozen=True)
class ChoiceParam(_ParamBase):
    choices: tuple[Any, ...]


@dataclass(frozen=True)
class FixedParam(_ParamBase):
    value: Any


Param = FloatParam | IntParam | ChoiceParam | FixedParam


def strongest_value(p: FloatParam | IntParam | ChoiceParam) -> Any:
    """The value of ``p`` that compresses most: the end of its range, or of its choices, away from
    its ``neutral`` value (the high end, the last choice, when the neutral one is not there)."""
    if isinstance(p, ChoiceParam):
        return p.choices[0] if p.choices[-1] == p.neutral else p.choices[-1]
    return p.low if p.neutral == p.high else p.high


@dataclass(frozen=True)
class BaseModelInfo:
    """What a method may inspect to decide its parameters: the base model and its fp32 export."""

    model: "torch.nn.Module"
    example_input: "torch.Tensor"
    onnx_path: Path
    target: "Target"


@dataclass
class CandidateContext:
    """What a method gets besides the model and its setting while one candidate is built."""

    workload: "Workload"
    teacher: "torch.nn.Module"  # the base model, never modified
    target: "Target"
    work_dir: Path
    seed: int
    #: Things a method could not handle and left alone: (method, what, why). Shown in the summary.
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    #: Free-form figures a method wants recorded with the trial (MACs, steps run ...).
    notes: dict[str, Any] = field(default_factory=dict)

    def skip(self, method: str, what: str, why: str) -> None:
        self.skipped.append((method, what, why))


class Method(abc.ABC):
    """Base class of a compression method plugin. See the module docstring for the stages.

    :meth:`parameters` and :meth:`apply` are abstract: a subclass lacking one cannot be
    instantiated, so a plugin registering it is reported and skipped."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    #: Order within a stage (lower runs first), e.g. block removal before channel pruning.
    order: ClassVar[int] = 0
    #: Frozen dataclass of this method's table in a search-space file.
    config_type: ClassVar[type]
    description: ClassVar[str] = ""
    #: Whether the search's first, 'uniform' anchor trials apply this method at every strength
    #: they try. ``False`` leaves its parameters at their ``neutral`` value there, for methods that
    #: are too blunt applied everywhere at once (removing every block the cap allows, factorizing
    #: every layer); the sampler still explores them afterwards.
    in_anchors: ClassVar[bool] = True

    def parse_config(self, table: Mapping[str, Any], source: str) -> Any:
        """Turn this method's table of a search-space file into ``config_type``.

        The default rejects unknown keys, converts ``[low, high]`` lists for fields annotated as
        ranges (tuples), and calls ``config_type``; ``__post_init__`` of the dataclass validates
        values by raising ``ValueError`` with the rule and the value it got.
        """
        return parse_dataclass(self.config_type, table, source=source, section=self.name)

    @abc.abstractmethod
    def parameters(self, config: Any, base: BaseModelInfo) -> Sequence[Param]:
        """The concrete parameters this method adds for ``base`` (names unique within the method)."""

    def canonical(self, setting: Mapping[str, Any], config: Any) -> Mapping[str, Any]:
        """``setting`` in the one form this method gives every setting that builds the same candidate,
        so the search can tell that two differently written settings are the same candidate (it does
        not propose one again, nor list it twice in the Pareto set). The default: the setting as it is.

        ``setting`` is complete: every parameter a trial samples for this method, by its short name
        (fixed values included; the on/off switch of an optional method and the parameters of a
        module another method removes left out). Return short names of this method's parameters.
        Quantization gives "per layer, every layer int8" as "the whole model int8". An exception is
        logged and the setting is taken as written."""
        return setting

    def changes_nothing(self, setting: Mapping[str, Any], config: Any) -> bool:
        """Whether ``setting`` (complete and canonical, as for :meth:`canonical`) leaves the model as
        it is, optional method or not. An optional method is then counted as switched off, the same
        candidate; when every structural method changes nothing the candidate is not fine-tuned (no
        recovery method runs, and their settings no longer tell candidates apart), so a structural
        method must answer True only where :meth:`apply` really leaves the model untouched. The
        default, False, is always safe. ``neutral`` values are not enough: they
        compress least within the space's range, which need not mean not at all (``bits = [8, 16]``
        has fp16 as its neutral). Quantization at fp32 everywhere, block removal removing nothing
        and low-rank at full rank everywhere change nothing."""
        return False

    @abc.abstractmethod
    def apply(self, subject: Any, setting: Mapping[str, Any], config: Any, ctx: CandidateContext) -> Any:
        """Apply the sampled ``setting`` (parameter name -> value) to ``subject`` and return the result.

        ``subject`` is a torch model for structural and recovery methods, and the path of an ONNX
        file for post-export methods. Raise :class:`autocomp.errors.CandidateError` when this
        candidate cannot be built; call ``ctx.skip`` for parts the method leaves alone.
        """


def parse_range(value: Any, *, key: str, source: str, section: str, kind: type = float,
                low: float | None = None, high: float | None = None) -> tuple[Any, Any]:
    """Read ``value`` as a ``[low, high]`` range (or one number, meaning a fixed value).

    Raises :class:`SpaceError` naming the file, the key and what is allowed.
    """
    where = f"{section}.{key}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        lo, hi = value
    else:
        raise SpaceError(
            f"expected a number or [low, high], got {value!r}", source=source, key=where
        )
    if kind is int and (int(lo) != lo or int(hi) != hi):
        raise SpaceError(f"expected whole numbers, got {value!r}", source=source, key=where)
    lo, hi = kind(lo), kind(hi)
    if lo > hi:
        raise SpaceError(f"`low <= high` must hold, but got (low={lo}, high={hi})", source=source, key=where)
    if low is not None and lo < low or high is not None and hi > high:
        raise SpaceError(
            f"values must lie in [{low}, {high}], got {value!r}", source=source, key=where
        )
    return lo, hi


def parse_dataclass(config_type: type, table: Mapping[str, Any], *, source: str, section: str) -> Any:
    """Build the frozen dataclass ``config_type`` from a TOML table, rejecting unknown keys."""
    if not isinstance(table, Mapping):
        raise SpaceError(f"expected a table, got {table!r}", source=source, key=section)
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise SpaceError(
            f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}",
            source=source, key=section,
        )
    hints = typing.get_type_hints(config_type)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return config_type(**kwargs)
    except SpaceError as exc:
        if exc.source:
            raise
        raise SpaceError(exc.message, source=source, key=exc.key or section) from exc
    except (TypeError, ValueError) as exc:
        raise SpaceError(str(exc), source=source, key=section) from exc
