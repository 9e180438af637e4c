"""Trials the search proposes itself, besides the sampler's: anchors and method toggles.

*Anchors* are enqueued before the sampler starts: the uniform recipes users would try by hand
(uniform pruning, every layer at its strongest precision), so the front always has them.

*Method toggles* follow the front during the search. A member of the feasible Pareto front is tried
again with one optional method toggled: without it if the member used it (an *ablation*), with it if
the member left it out (an *addition*). Everything else stays fixed and the toggled trial fine-tunes
with the same seed, so the two differ only in that method; parameters the toggle reveals (the
precision of each layer when quantization goes in, the pruning ratios of a block that no longer goes)
are drawn by the sampler. A joint space is much larger than a single-method one, and the sampler,
once a combination of methods has paid off, keeps to it in nearly every trial (benchmarks/
joint_vs_single.md); toggles make the search ask, of each of its best candidates, whether a simpler
combination does as well and whether one more method makes it faster. They are paced (see
:class:`MethodToggles`): newest front member first, at most :data:`TOGGLE_SHARE` of the trials
finished so far, rounded up, and of the whole budget, rounded down.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from autocomp.method import ChoiceParam, FloatParam, IntParam
from autocomp.space import GATE, ConcreteSpace

__all__ = ["ANCHOR_QUANTILES", "TOGGLE_SHARE", "anchors", "MethodToggles", "toggle_origin"]

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


#: Most of the trial budget method toggles may take (rounded down); the sampler keeps the rest.
TOGGLE_SHARE = 0.25

#: User attributes of an enqueued toggle: the trial it varies and the method it leaves out (an
#: ablation) or puts in (an addition), and the trial whose fine-tuning seed it reuses (so a toggle and
#: its source differ only in that method).
ABLATION_OF, ABLATED = "ablation_of", "ablated"
ADDITION_OF, ADDED = "addition_of", "added"
SEED_OF = "seed_of"
#: the user attributes that record the source trial and the method, by whether the toggle switches
#: the method on (an addition) or off (an ablation)
TOGGLE_ATTRS = {False: (ABLATION_OF, ABLATED), True: (ADDITION_OF, ADDED)}
_ORIGIN_KEYS = tuple(k for keys in TOGGLE_ATTRS.values() for k in keys)


def toggle_origin(user_attrs: dict[str, Any], with_seed: bool = False) -> dict[str, Any]:
    """Where a trial came from when it is a method toggle (its source trial and the method, as
    ``ablation_of``/``ablated`` or ``addition_of``/``added``; with ``with_seed``, also ``seed_of``);
    empty for any other trial."""
    keys = (*_ORIGIN_KEYS, SEED_OF) if with_seed else _ORIGIN_KEYS
    return {k: user_attrs[k] for k in keys if k in user_attrs}


class MethodToggles:
    """An Optuna callback: after each finished trial, enqueue members of the current feasible front
    with one optional method toggled (see the module's docs), newest member first, while the toggles
    stay within ``share`` of the trials finished so far (rounded up) and of ``trials`` (rounded
    down), and while the budget has room for them to run.

    Pacing them with the finished trials spreads them over the run: the front of the first few
    trials (the anchors) would otherwise use up the whole share, and the members found later, the
    better ones, would get none. A member that is itself a toggle is not toggled back on the same
    method. Counts what it has enqueued from the study itself (the user attributes of every trial),
    so a resumed run keeps to the same cap; a setting already tried, failed or waiting is not enqueued
    again. Several workers on one storage read the study at the same time: when their trials finish at
    once they may pass the cap by one or two, or enqueue the same toggle twice. A toggle a stopped
    run did not finish is enqueued again on resume (:meth:`requeue_interrupted`).
    """

    def __init__(self, space: ConcreteSpace, trials: int, share: float = TOGGLE_SHARE):
        self.gated = [m.name for m, _, _ in space.entries if m.name in space.gated]
        self.share = share
        self.trials = trials
        self.budget = int(trials * share)
        #: per optional method, its parameters' neutral values (those that have one)
        self.neutral = {m.name: {f"{m.name}.{p.name}": p.neutral for p in params if p.name != GATE}
                        for m, _, params in space.entries if m.name in space.gated}

    def allowed(self, finished: int) -> int:
        """How many toggles a study may hold once ``finished`` trials have finished."""
        return min(self.budget, math.ceil(self.share * finished - 1e-9))  # 0.07 * 100 is 7.000000000000001

    def proposals(self, params: dict[str, Any]) -> list[tuple[str, bool, dict[str, Any]]]:
        """``(method, switched_on, params)`` for each optional method: left out where ``params``
        switches it on and it changes something (a parameter away from its neutral value), put in
        where ``params`` switches it off; everything else as in ``params``."""
        out = []
        for method in self.gated:
            gate = f"{method}.{GATE}"
            if not isinstance(params.get(gate), bool):
                continue
            rest = {k: v for k, v in params.items() if not k.startswith(f"{method}.")}
            if params[gate]:
                own = {k: v for k, v in params.items() if k.startswith(f"{method}.") and k != gate}
                neutral = self.neutral[method]
                if own and all(neutral.get(k) is not None and v == neutral[k] for k, v in own.items()):
                    continue  # switched on but doing nothing (no block removed, every layer at fp32)
            out.append((method, not params[gate], {**rest, gate: not params[gate]}))
        return out

    def requeue_interrupted(self, study) -> int:
        """Enqueue again every toggle a stopped run left unfinished (failed by the interruption, or
        closed as failed on resume); returns how many."""
        existing = study.get_trials(deepcopy=False)
        seen = [_setting(t) for t in existing if not _interrupted(t)]
        return sum(_enqueue_new(study, t.system_attrs.get("fixed_params", {}),
                                toggle_origin(t.user_attrs, with_seed=True), seen)
                   for t in existing if _toggled(t) and _interrupted(t))

    def __call__(self, study, trial) -> None:
        # called after every finished trial (complete, pruned or failed): each one paces the toggles
        if not self.gated or self.budget <= 0:
            return
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        # an interrupted toggle is enqueued again on resume: it does not use up the cap twice
        used = sum(_toggled(t) for t in trials if not _interrupted(t))
        allowed = self.allowed(finished)

        def full() -> bool:  # the share is used up, or a toggle queued now would not run
            return used >= allowed or finished + waiting >= self.trials

        if full():
            return
        seen = [_setting(t) for t in trials]  # a failed setting too: a failure is not retried
        for member in sorted(study.best_trials, key=lambda t: t.number, reverse=True):
            came_from = {member.user_attrs.get(ABLATED), member.user_attrs.get(ADDED)}
            for method, switched_on, params in self.proposals(member.params):
                if full():
                    return
                if method in came_from:
                    continue  # toggling it back would redo the member's own source
                source_key, method_key = TOGGLE_ATTRS[switched_on]
                attrs = {source_key: member.number, method_key: method,
                         SEED_OF: member.user_attrs.get(SEED_OF, member.number)}
                if _enqueue_new(study, params, attrs, seen):
                    logger.info("trial %d is on the front: queued it %s %s", member.number,
                                "with" if switched_on else "without", method)
                    used += 1
                    waiting += 1


def _toggled(trial) -> bool:
    return bool(toggle_origin(trial.user_attrs))


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
