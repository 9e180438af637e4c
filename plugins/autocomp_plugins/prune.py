"""Method ``prune``: structured channel pruning with torch-pruning's dependency graph.

A prunable group is the set of layers whose channels must be removed together (a conv, its batch
norm, the next conv's inputs, and everything tied to them by residual additions); it is named after
its root layer. A fused attention projection (a module with a Linear ``qkv`` and integer
``num_heads`` and ``head_dim``, as in the zoo's ViT and timm) is pruned by head dimensions: a unit is
one dimension removed from q, k and v of every head at once, so the reshape into heads stays valid.
Depthwise convolutions follow the layer that feeds them. The final classifier is never pruned.

How many units a group keeps (``scope``):

- ``"group"``: one sampled ratio per group.
- ``"global"``: one sampled ``global_ratio``; the units of all groups are ranked together by their
  importance divided by their group's mean importance and the lowest go first, until that fraction
  of all channels is gone; no group loses more than the upper bound of ``ratio``, so none is emptied.

Kept counts are rounded to a multiple of ``round_to`` because latency on real runtimes is not
monotone in channel count.

Which units go (``importance``): ``l1`` / ``l2`` weight magnitude of the whole group; ``taylor``,
|weight x gradient| of the workload's loss over a few training batches (Molchanov et al., 2019);
``activation``, the mean absolute activation each channel feeds to the next layers over a few
training batches; ``random``, seeded. With ``progressive_steps = n`` the ratios are reached in n
equal steps, importance re-estimated before each, with ``finetune_steps`` minibatches of plain
fine-tuning between steps.

A group that cannot be pruned so that the model still runs (a custom layer torch-pruning does not
know, a grouped convolution, an attention layout it cannot map) is left alone and reported through
``ctx.skip``; it never fails the candidate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from autocomp.errors import CandidateError, SpaceError
from autocomp.hookspecs import hookimpl
from autocomp.method import BaseModelInfo, CandidateContext, ChoiceParam, FloatParam, Method, Param, parse_range
from autocomp_plugins._prune_groups import (
    Group,
    UntraceableModel,
    dependency_graph,
    find_groups,
    keep_count,
    prunable_groups,
    score_groups,
)

__all__ = ["PruneConfig", "PruneMethod", "prunable_groups", "prune_model"]

logger = logging.getLogger("autocomp")

IMPORTANCES = ("l1", "l2", "taylor", "activation", "random")
SCOPES = ("group", "global")
#: Parameter names that are not group names.
_RESERVED = ("importance", "scope", "global_ratio")


def _choices(value: Any, allowed: tuple[str, ...], key: str) -> tuple[str, ...]:
    """One allowed name, or a non-empty list of them (searched over) -> tuple of names."""
    values = (value,) if isinstance(value, str) else value
    if (not isinstance(values, (list, tuple)) or not values or len(set(values)) != len(values)
            or any(v not in allowed for v in values)):
        raise SpaceError(f"{key} must be one of {', '.join(allowed)} (or a list of them to search over), "
                         f"got {value!r}", key=f"prune.{key}")
    return tuple(values)


def _whole(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpaceError(f"{key} must be a whole number >= {low}, got {value!r}", key=f"prune.{key}")
    return value


@dataclass(frozen=True)
class PruneConfig:
    """``[prune]`` table: ``ratio`` is a fraction of channels removed, sampled per group (or, with
    ``scope = "global"``, once for the whole model as ``global_ratio``). ``importance`` and ``scope``
    take one name, or a list of names for the search to choose from."""

    ratio: tuple[float, float] = (0.0, 0.7)
    importance: str | tuple[str, ...] = "l2"
    round_to: int = 8
    step: float = 0.05
    scope: str | tuple[str, ...] = "group"
    #: Reach the ratios in this many equal steps, re-estimating importance before each.
    progressive_steps: int = 1
    #: Minibatches of plain fine-tuning (task loss, SGD) between progressive steps.
    finetune_steps: int = 0
    finetune_lr: float = 0.005
    #: Training batches that ``taylor`` and ``activation`` importance are estimated on.
    importance_batches: int = 4

    def __post_init__(self) -> None:
        ratio = list(self.ratio) if isinstance(self.ratio, (tuple, list)) else self.ratio  # one number: fixed
        lo, hi = parse_range(ratio, key="ratio", source="", section="prune", low=0.0, high=0.95)
        object.__setattr__(self, "ratio", (lo, hi))
        object.__setattr__(self, "importance", _choices(self.importance, IMPORTANCES, "importance"))
        object.__setattr__(self, "scope", _choices(self.scope, SCOPES, "scope"))
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a whole number >= 1, got {self.round_to!r}")
        if not (0 < self.step <= 0.5):
            raise ValueError(f"step must lie in (0, 0.5], got {self.step!r}")
        _whole(self.progressive_steps, "progressive_steps", 1)
        _whole(self.finetune_steps, "finetune_steps", 0)
        _whole(self.importance_batches, "importance_batches", 1)
        if self.finetune_steps > 0 and self.progressive_steps == 1:
            raise SpaceError("finetune_steps fine-tunes between progressive steps, so it needs "
                             f"progressive_steps >= 2, got progressive_steps = 1 and finetune_steps = "
                             f"{self.finetune_steps}", key="prune.finetune_steps")
        lr = self.finetune_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < 10):
            raise SpaceError(f"finetune_lr must lie in (0, 10), got {lr!r}", key="prune.finetune_lr")


# --- pruning with rollback ----------------------------------------------------------------------


def _snapshot(model) -> list:
    """What torch-pruning changes when it prunes: module attributes, parameters, buffers. It always
    assigns new tensors, never edits them in place, so shallow copies are enough to roll back."""
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in model.modules()]


def _restore(snapshot: list) -> None:
    for module, attributes, parameters, buffers in snapshot:
        module.__dict__.clear()
        module.__dict__.update(attributes)
        module.__dict__["_parameters"] = dict(parameters)
        module.__dict__["_buffers"] = dict(buffers)


def _output_shapes(output) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (list, tuple)):
        return tuple(_output_shapes(o) for o in output)
    if isinstance(output, dict):
        return tuple((k, _output_shapes(v)) for k, v in sorted(output.items()))
    return type(output).__name__


def _check_runs(model, example_input, expected) -> None:
    import torch

    with torch.no_grad():
        shapes = _output_shapes(model(example_input))
    if shapes != expected:
        raise RuntimeError(f"the output shape changed from {expected} to {shapes}")


def _touches(dg, group) -> str:
    """Parameters outside standard layers that a group touches (custom layers), for a skip reason."""
    import torch_pruning as tp

    names = [dg._param_to_name.get(item.dep.target.module, "?") for item in group
             if item.dep.target.type == tp.ops.OPTYPE.PARAMETER]
    return f"; it touches parameter(s) {', '.join(sorted(set(names)))} of a layer it does not know" if names else ""


def _units_group(dg, g: Group, units: list[int]):
    """The torch-pruning group that removes ``units`` of ``g``."""
    import torch_pruning as tp

    if g.attention is not None:
        head_dim = g.attention.head_dim
        idxs = [h * head_dim + u for h in range(g.attention.num_heads) for u in units]
        return dg.get_pruning_group(g.consumer, tp.prune_linear_in_channels, idxs=idxs)
    return dg.get_pruning_group(g.root, g.prune_fn, idxs=units)


def _prune_group(group, g: Group) -> None:
    group.prune()
    if g.attention is not None:  # the zoo's and timm's attention read head_dim in forward
        g.attention.head_dim = g.root.out_features // (3 * g.attention.num_heads)


_EMPTIES = "pruning would leave a layer with no channels"


def _prune_plan(model, example_input, dg, plan: list[tuple[Group, list[int]]], failed: dict[str, str]) -> None:
    """Prune every (group, units) of ``plan``; a group after which the model no longer runs (or
    that torch-pruning fails on) is rolled back and recorded in ``failed`` with the reason."""
    import torch

    with torch.no_grad():
        expected = _output_shapes(model(example_input))
    whole = _snapshot(model)
    try:  # the usual case: everything prunes and the model runs
        for g, units in plan:
            group = _units_group(dg, g, units)
            if dg.check_pruning_group(group):
                _prune_group(group, g)
            else:
                failed[g.name] = _EMPTIES
        _check_runs(model, example_input, expected)
        return
    except Exception:
        _restore(whole)
        for g, _ in plan:
            failed.pop(g.name, None)
    # Something broke the model: redo group by group, keeping only what leaves it runnable.
    dg = dependency_graph(model, example_input)
    for g, units in plan:
        before = _snapshot(model)
        touches = ""
        try:
            group = _units_group(dg, g, units)
            if not dg.check_pruning_group(group):
                failed[g.name] = _EMPTIES
                continue
            touches = _touches(dg, group)
            _prune_group(group, g)
            _check_runs(model, example_input, expected)
        except Exception as exc:
            _restore(before)
            dg = dependency_graph(model, example_input)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failed[g.name] = (f"torch-pruning cannot prune this group and keep the model running "
                              f"({type(exc).__name__}: {message}){touches}")


# --- planning -----------------------------------------------------------------------------------


def _lowest(score, count: int) -> list[int]:
    import torch

    return sorted(int(i) for i in torch.argsort(score, stable=True)[:count])


def _global_keep(groups: Sequence[Group], scores: Mapping[str, Any], original: Mapping[str, tuple[int, int]],
                 fraction: float, max_ratio: float, round_to: int) -> dict[str, int]:
    """Units each group keeps so that about ``fraction`` of all original channels is gone."""
    total = sum(original[g.name][0] for g in groups)
    removed = sum(original[g.name][0] - g.current_channels() for g in groups)
    target = fraction * total
    candidates = []
    for g in groups:
        score = scores[g.name]
        normalized = score / score.mean().clamp(min=1e-12) if float(score.mean()) > 0 else score
        candidates += [(float(v), g.name) for v in normalized]
    candidates.sort(key=lambda c: c[0])
    by_name = {g.name: g for g in groups}
    current = {g.name: g.units() for g in groups}
    taken = dict.fromkeys(current, 0)
    for _, name in candidates:
        g = by_name[name]
        channels, units = original[name]
        weight = channels / units  # channels one unit stands for (3 x heads for a head dimension)
        if removed + weight / 2 > target:
            continue
        floor = max(1, math.ceil(units * (1.0 - max_ratio) - 1e-9))
        if current[name] - taken[name] - 1 < floor:
            continue
        taken[name] += 1
        removed += weight
    keep = {}
    for name, units_now in current.items():
        units = original[name][1]
        ratio = 1.0 - (units_now - taken[name]) / units
        keep[name] = min(units_now, keep_count(units, ratio, round_to))
    return keep


def _finetune(model, workload, steps: int, lr: float, seed: int) -> None:
    """``steps`` minibatches of plain task-loss SGD (between progressive pruning steps)."""
    import torch

    train = workload.train
    size = max(1, int(workload.batch_size))
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    perm, pos = torch.randperm(len(train), generator=generator), 0
    for _ in range(steps):
        if pos + size > len(train):
            perm, pos = torch.randperm(len(train), generator=generator), 0
        idx = perm[pos : pos + size]
        pos += size
        loss = workload.compute_loss(model(train.inputs[idx]), train.targets[idx])
        if not torch.isfinite(loss):
            raise CandidateError(f"fine-tuning between pruning steps diverged (loss {float(loss)}); "
                                 "lower [prune] finetune_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()


def prune_model(model, example_input, ratios: Mapping[str, float] | float, importance: str = "l2",
                round_to: int = 8, skip: Callable[[str, str], None] | None = None, *, workload=None,
                seed: int = 0, max_ratio: float = 0.95, progressive_steps: int = 1, finetune_steps: int = 0,
                finetune_lr: float = 0.005, importance_batches: int = 4,
                notes: dict[str, Any] | None = None) -> dict[str, tuple[int, int]]:
    """Prune ``model`` in place and return group name -> (channels before, channels kept).

    ``ratios`` is either group root name -> fraction of its channels removed, or one number: the
    fraction of all channels removed, ranked across groups (global scope, no group losing more than
    ``max_ratio``). ``taylor`` and ``activation`` importance and ``finetune_steps`` need
    ``workload``. Groups that cannot be pruned are left alone and passed to ``skip(name, why)``.
    Raises :class:`CandidateError` when torch-pruning cannot trace the model at all, and ValueError
    for an unknown importance or a missing workload.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if workload is None and (importance in ("taylor", "activation") or (finetune_steps > 0 and progressive_steps > 1)):
        raise ValueError(f"importance {importance!r} and fine-tuning between steps need a workload")
    is_global = not isinstance(ratios, Mapping)
    if is_global and not 0.0 <= float(ratios) <= max_ratio:
        raise ValueError(f"a global ratio must lie in [0, {max_ratio}], got {ratios!r}")
    steps = max(1, int(progressive_steps))
    failed: dict[str, str] = {}
    fallbacks: list[str] = []
    original: dict[str, tuple[int, int]] = {}  # name -> (channels, units) before pruning
    wanted: list[str] = []
    groups: list[Group] = []
    was_training = model.training
    model.eval()
    try:
        for step in range(1, steps + 1):
            dg = dependency_graph(model, example_input)
            groups = find_groups(model, dg)
            if step == 1:
                original = {g.name: (g.channels, g.units()) for g in groups}
                known = {g.name: g for g in groups}
                if is_global:
                    wanted = [g.name for g in groups]
                else:
                    modules = dict(model.named_modules())
                    for name, ratio in ratios.items():
                        if ratio <= 0:
                            continue
                        if name in known:
                            wanted.append(name)
                        elif name not in modules:
                            failed[name] = "layer not present in this candidate (removed earlier)"
                        else:
                            failed[name] = "not the root of a prunable group in this model"
                for g in groups:
                    if g.unsupported and g.name in wanted:
                        failed[g.name] = g.unsupported
            active = [g for g in groups if g.name in wanted and g.name not in failed]
            if not active:
                break
            fraction = step / steps
            if is_global:
                scores = score_groups(model, dg, active, importance, workload=workload, seed=seed + step,
                                       batches=importance_batches, fallbacks=fallbacks)
                for g in active:
                    if g.name not in scores:
                        failed[g.name] = "no importance could be computed for this group"
                active = [g for g in active if g.name in scores]
                keep = _global_keep(active, scores, original, fraction * float(ratios), max_ratio, round_to)
            else:
                keep = {g.name: min(g.units(), keep_count(original[g.name][1], ratios[g.name] * fraction, round_to))
                        for g in active}
                active = [g for g in active if keep[g.name] < g.units()]
                scores = score_groups(model, dg, active, importance, workload=workload, seed=seed + step,
                                       batches=importance_batches, fallbacks=fallbacks) if active else {}
                for g in active:
                    if g.name not in scores:
                        failed[g.name] = "no importance could be computed for this group"
            plan = [(g, _lowest(scores[g.name], g.units() - keep[g.name])) for g in active
                    if g.name in scores and keep[g.name] < g.units()]
            if plan:
                _prune_plan(model, example_input, dg, plan, failed)
            if step < steps and finetune_steps > 0:
                _finetune(model, workload, finetune_steps, finetune_lr, seed + 7919 * step)
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    if skip is not None:
        for name, why in failed.items():
            skip(name, why)
    if notes is not None and fallbacks:
        notes["prune_importance_fallback"] = sorted(set(fallbacks))
    live = {g.name: g for g in groups}  # their layers are the pruned model's own
    return {name: (original[name][0], live[name].current_channels())
            for name in wanted if name not in failed and name in live}


class PruneMethod(Method):
    name = "prune"
    stage = "structural"
    order = 10
    config_type = PruneConfig
    description = ("structured channel pruning (torch-pruning): magnitude, Taylor or activation importance, "
                   "per-group or global ratios, optionally progressive")

    def parameters(self, config: PruneConfig, base: BaseModelInfo) -> Sequence[Param]:
        lo, hi = config.ratio
        step = config.step if hi > lo else None
        if step is not None:
            # Optuna needs (high - low) to be a multiple of step
            hi = round(lo + step * math.floor((hi - lo) / step + 1e-9), 10)
        try:
            dg = dependency_graph(base.model, base.example_input)
        except UntraceableModel as exc:
            logger.warning("prune: channel pruning is off for this model: %s", exc)
            return []
        groups = find_groups(base.model, dg)
        for g in groups:
            if g.unsupported:
                logger.info("prune: group %s is never pruned: %s", g.name, g.unsupported)
        params: list[Param] = []
        if len(config.importance) > 1:
            params.append(ChoiceParam("importance", config.importance))
        choose_scope = len(config.scope) > 1
        if choose_scope:
            params.append(ChoiceParam("scope", config.scope))
        if "global" in config.scope:
            params.append(FloatParam("global_ratio", lo, hi, step=step, neutral=lo,
                                     only_if=("prune.scope", "global") if choose_scope else None))
        if "group" in config.scope:
            only_if = ("prune.scope", "group") if choose_scope else None
            params += [FloatParam(g.name, lo, hi, step=step, module=g.name, only_if=only_if, neutral=lo)
                       for g in groups if g.unsupported is None and g.name not in _RESERVED]
        return params

    @staticmethod
    def _ratios(setting: Mapping[str, Any], config: PruneConfig) -> Mapping[str, float] | float:
        """The global ratio, or the ratio per group, that ``setting`` prunes at."""
        if setting.get("scope", config.scope[0]) == "global":
            return float(setting.get("global_ratio", 0.0))
        return {k: float(v) for k, v in setting.items() if k not in _RESERVED}

    @staticmethod
    def _prunes_nothing(ratios: Mapping[str, float] | float) -> bool:
        return ratios <= 0 if isinstance(ratios, float) else not any(r > 0 for r in ratios.values())

    def changes_nothing(self, setting: Mapping[str, Any], config: PruneConfig) -> bool:
        """Every ratio 0 (the global one, or each group's)."""
        return self._prunes_nothing(self._ratios(setting, config))

    def apply(self, model, setting: Mapping[str, Any], config: PruneConfig, ctx: CandidateContext):
        importance = setting.get("importance", config.importance[0])
        scope = setting.get("scope", config.scope[0])
        ratios = self._ratios(setting, config)
        if self._prunes_nothing(ratios):
            return model
        ctx.notes["prune_importance"] = importance
        ctx.notes["prune_scope"] = scope
        try:
            kept = prune_model(model, ctx.workload.example_input, ratios, importance, config.round_to,
                               skip=lambda what, why: ctx.skip(self.name, what, why), workload=ctx.workload,
                               seed=ctx.seed, max_ratio=config.ratio[1],
                               progressive_steps=config.progressive_steps, finetune_steps=config.finetune_steps,
                               finetune_lr=config.finetune_lr, importance_batches=config.importance_batches,
                               notes=ctx.notes)
        except UntraceableModel as exc:
            ctx.skip(self.name, "model", str(exc))
            return model
        ctx.notes["prune_channels"] = {k: list(v) for k, v in kept.items()}
        return model


@hookimpl
def register_methods(register):
    register(PruneMethod())
