"""Trials the search proposes itself, besides the sampler's: anchors and ablations.

*Anchors* are enqueued before the sampler starts: the uniform recipes users would try by hand
(uniform pruning, every layer at its strongest precision), so the front always has them.

*Ablations* follow the front during the search. When a trial joins the feasible Pareto front, the
same setting is enqueued once more for each optional method it used, with that method left out
(everything else fixed; parameters the left-out method had hidden, such as the pruning ratios of a
block it removed, are drawn by the sampler). A joint space is much larger than a single-method one,
and the sampler, once a method has paid off, keeps it on in nearly every trial; ablations make the
search ask, for each of its best candidates, whether a simpler combination does as well.
At most :data:`ABLATION_SHARE` of the trial budget goes to them.
"""

from __future__ import annotations

import logging
from typing import Any

from autocomp.method import ChoiceParam, FloatParam, IntParam
from autocomp.space import GATE, ConcreteSpace

__all__ = ["ANCHOR_QUANTILES", "ABLATION_SHARE", "anchors", "Ablations"]

logger = logging.getLogger("autocomp")

ANCHOR_QUANTILES = (0.5, 0.67, 0.85)


def anchors(space: ConcreteSpace) -> list[dict[str, Any]]:
    """The trials enqueued before the sampler takes over, mildest first: the uniform recipe at each
    of :data:`ANCHOR_QUANTILES`, dropping any that compresses nothing or repeats an earlier one.

    (Tried and measured twice, with the p50 and with the fastest run: adding, at each quantile, the
    recipe with each optional anchored method left out. On the digits benchmark at 40 trials it did
    not help the joint front either time; see benchmarks/joint_vs_single.md.)
    """
    found: list[dict[str, Any]] = []
    for quantile in ANCHOR_QUANTILES:
        anchor = _anchor_params(space, quantile)
        if _compresses(anchor, space) and anchor not in found:
            found.append(anchor)
    return found


def _anchor_params(space: ConcreteSpace, quantile: float) -> dict[str, Any]:
    """A 'uniform' trial: every range at the same strength, every choice at its strongest.

    Enqueued first so the front always contains the simple uniform recipes users would try by hand
    (uniform pruning, every layer at its strongest precision). A parameter with a ``neutral`` value
    is moved away from it by ``quantile`` of its range (a choice goes to the choice farthest from
    it); one without is set at ``quantile`` of its range, or to its first choice (the space's
    default). Methods that are not ``in_anchors`` stay at their neutral values (switched off if
    optional).
    """
    params: dict[str, Any] = {}
    for method, _, declared in space.entries:
        for p in declared:
            key = f"{method.name}.{p.name}"
            if not method.in_anchors:
                if p.neutral is not None:
                    params[key] = p.neutral
            elif isinstance(p, (FloatParam, IntParam)) and p.low != p.high:
                # the fraction ``quantile`` of the way from the neutral end (the low end when none)
                start, end = (p.high, p.low) if p.neutral is not None and p.neutral == p.high else (p.low, p.high)
                value = start + quantile * (end - start)
                if p.step:
                    value = p.low + round((value - p.low) / p.step) * p.step
                params[key] = min(p.high, max(p.low, value))
            elif isinstance(p, ChoiceParam) and len(p.choices) > 1:
                if p.neutral is None:
                    params[key] = p.choices[0]
                else:
                    params[key] = p.choices[0] if p.choices[-1] == p.neutral else p.choices[-1]
    return params


def _compresses(anchor: dict[str, Any], space: ConcreteSpace) -> bool:
    """Whether ``anchor`` moves some parameter away from its neutral value (a space of methods that
    all stay out of the anchors would otherwise enqueue the base model)."""
    return any(p.neutral is not None and f"{m.name}.{p.name}" in anchor and anchor[f"{m.name}.{p.name}"] != p.neutral
               for m, _, params in space.entries for p in params)


#: Most of the trial budget ablations may take (rounded down); the sampler keeps the rest.
ABLATION_SHARE = 0.25

#: User attributes of an enqueued ablation: the trial it ablates, the method it leaves out, and the
#: trial whose fine-tuning seed it reuses (so an ablation and its source differ only in that method).
ABLATION_OF, ABLATED, SEED_OF = "ablation_of", "ablated", "seed_of"


class Ablations:
    """An Optuna callback: when a finished trial is on the feasible front, enqueue it without each
    optional method it used (see the module's docs), within ``share`` of ``trials``.

    Counts what it has enqueued from the study itself (the user attributes of every trial), so a
    resumed run keeps to the same cap (several workers on one storage may pass it by one or two when
    their trials finish at once); a setting already tried or waiting is not enqueued again. An
    ablation a stopped run did not finish is enqueued again on resume (:meth:`requeue_interrupted`).
    """

    def __init__(self, space: ConcreteSpace, trials: int, share: float = ABLATION_SHARE):
        self.gated = [m.name for m, _, _ in space.entries if m.name in space.gated]
        self.budget = int(trials * share)
        #: per optional method, its parameters' neutral values (those that have one)
        self.neutral = {m.name: {f"{m.name}.{p.name}": p.neutral for p in params if p.name != GATE}
                        for m, _, params in space.entries if m.name in space.gated}

    def proposals(self, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """``(method, params)`` for each optional method ``params`` switches on and that changes
        something (a parameter away from its neutral value), with that method left out."""
        out = []
        for method in self.gated:
            if params.get(f"{method}.{GATE}") is not True:
                continue
            own = {k: v for k, v in params.items() if k.startswith(f"{method}.") and k != f"{method}.{GATE}"}
            neutral = self.neutral[method]
            if own and all(neutral.get(k) is not None and v == neutral[k] for k, v in own.items()):
                continue  # switched on but doing nothing (no block removed, every layer at fp32)
            ablated = {k: v for k, v in params.items() if not k.startswith(f"{method}.")}
            ablated[f"{method}.{GATE}"] = False
            out.append((method, ablated))
        return out

    def requeue_interrupted(self, study) -> int:
        """Enqueue again every ablation a stopped run left unfinished (failed by the interruption,
        or closed as failed on resume); returns how many."""
        existing = study.get_trials(deepcopy=False)
        seen = [_setting(t) for t in existing if not _interrupted(t)]
        return sum(_enqueue_new(study, t.system_attrs.get("fixed_params", {}),
                                {k: t.user_attrs[k] for k in (ABLATION_OF, ABLATED, SEED_OF) if k in t.user_attrs}, seen)
                   for t in existing if ABLATION_OF in t.user_attrs and _interrupted(t))

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        if trial.state != TrialState.COMPLETE or not self.gated or self.budget <= 0:
            return
        if trial.number not in {t.number for t in study.best_trials}:
            return
        existing = [t for t in study.get_trials(deepcopy=False) if not _interrupted(t)]
        used = sum(ABLATION_OF in t.user_attrs for t in existing)
        seen = [_setting(t) for t in existing]
        for method, params in self.proposals(trial.params):
            if used >= self.budget:
                return
            attrs = {ABLATION_OF: trial.number, ABLATED: method, SEED_OF: trial.user_attrs.get(SEED_OF, trial.number)}
            if _enqueue_new(study, params, attrs, seen):
                logger.info("trial %d is on the front: trying it without %s next", trial.number, method)
                used += 1


def _enqueue_new(study, params: dict[str, Any], user_attrs: dict[str, Any], seen: list[dict[str, Any]]) -> bool:
    """Enqueue ``params`` and add it to ``seen``, unless a trial in ``seen`` already has that
    setting; returns whether it was enqueued."""
    if not params or any(_agrees(params, other) for other in seen):
        return False
    study.enqueue_trial(params, user_attrs=user_attrs)
    seen.append(params)
    return True


def _setting(trial) -> dict[str, Any]:
    # a waiting (enqueued, not yet run) trial has no params yet, only the ones it was enqueued with
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def _interrupted(trial) -> bool:
    """A trial that failed because the run stopped, not because of its candidate: failed by a signal
    or Ctrl-C, or closed as failed on resume (no reason recorded)."""
    from optuna.trial import TrialState

    reason = trial.user_attrs.get("failure_reason")
    return trial.state == TrialState.FAIL and (reason is None or reason.startswith(("KeyboardInterrupt", "SystemExit")))


def _agrees(fixed: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether a trial with ``params`` already tried (or will try) the setting ``fixed``."""
    return all(params.get(k, object()) == v for k, v in fixed.items())
