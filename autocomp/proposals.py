"""Trials the search proposes itself, besides the sampler's: anchors, method toggles and strength steps.

*Anchors* are enqueued before the sampler starts: the uniform recipes users would try by hand
(uniform pruning, every layer at its strongest precision), so the front always has them.

*Method toggles* follow the front during the search. A member of the feasible Pareto front is tried
again with one optional method toggled: without it if the member used it (an *ablation*), with it if
the member left it out or had it on doing nothing, as quantization at fp32 (an *addition*).
Everything else stays fixed and the toggled trial fine-tunes with the same seed, so the two differ
only in that method. The parameters a toggle reveals (the pruning ratios of a block that no longer
goes, the blocks to remove when block removal goes in) are drawn by the sampler, except that a
method taking part in the anchors goes in with its anchor setting (quantization: every layer at the
anchors' precision, the strongest offered, or with ``per_layer = "sampled"`` the strongest every
layer can take). A joint space is much larger than a single-method one, and the sampler, once a
combination of methods has paid off, keeps to it in nearly every trial
(benchmarks/joint_vs_single.md); toggles make the search ask, of each of its best candidates,
whether a simpler combination does as well and whether one more method makes it faster. They are
paced (see :class:`_FrontProposals`): newest front member first, at most :data:`TOGGLE_SHARE` of the
trials finished so far, rounded up, and of the whole budget, rounded down.

*Strength steps* follow the front too, in any space: a member is tried again with every compression
range it sampled (pruning ratios, rank ratios) moved a step toward its strongest end, and a step toward
its neutral end, everything else fixed and the same seed (:class:`StrengthSteps`). Within a range the
sampler settles on one region; a step asks what each of the best recipes gives a little harder or a
little softer. Paced like the toggles, with a share of their own, :data:`STEP_SHARE`.

*Siblings* are toggles of a post-export method (quantization) that need no training: the search
builds them from the trial's own trained model, exported once, with the method put in or left out
(:meth:`MethodToggles.post_export`), and adds them to the study as trials of their own
(``sibling_of``). A toggled trial would fine-tune the same structure with the same seed only to
export it differently. Siblings are not proposals: they take no share, no trial of the budget, and
the toggles do not queue a setting a sibling already tried.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from typing import Any

from autocomp.method import ChoiceParam, FloatParam, IntParam, strongest_value
from autocomp.space import GATE, ConcreteSpace, same_value

__all__ = ["ANCHOR_QUANTILES", "TOGGLE_SHARE", "STEP_SHARE", "STEP_SIZE", "anchors", "MethodToggles", "StrengthSteps",
           "proposal_origin", "is_sibling", "tried"]

logger = logging.getLogger("autocomp")

ANCHOR_QUANTILES = (0.5, 0.67, 0.85)


def anchors(space: ConcreteSpace) -> list[dict[str, Any]]:
    """The trials enqueued before the sampler takes over, mildest first: the post-export methods
    alone (:func:`_post_export_alone`), then the uniform recipe at each of :data:`ANCHOR_QUANTILES`,
    dropping any that compresses nothing or repeats an earlier one.

    (Tried and measured twice, with the p50 and with the fastest run: adding, at each quantile, the
    recipe with each optional anchored method left out. On the digits benchmark at 40 trials it did
    not help the joint front either time; see benchmarks/joint_vs_single.md.)
    """
    found: list[dict[str, Any]] = []
    for quantile in (None, *ANCHOR_QUANTILES):
        anchor = _post_export_alone(space) if quantile is None else _anchor_params(space, quantile)
        if _compresses(anchor, space) and anchor not in found:
            found.append(anchor)
    return found


def _post_export_alone(space: ConcreteSpace) -> dict[str, Any]:
    """The post-export methods alone: the mildest uniform anchor with every parameter of the other
    methods at its neutral value (no pruning where the ratio's range starts at 0), so every layer
    int8 on the mildest structure the space allows. Quantization alone is the recipe users try
    first (every quantization-only tool offers it); without this anchor the joint search met it
    only when the sampler drew no pruning, and its front missed quantization alone's most accurate
    point in several runs of benchmarks/joint_vs_single.md (seeds 0 and 2 with the int8 glue on the
    previous host, among others). In a space without an
    anchored post-export method it compresses nothing (or repeats the mildest anchor) and is not
    enqueued."""
    params = _anchor_params(space, ANCHOR_QUANTILES[0])
    for method, _, declared in space.entries:
        if method.stage != "post_export":
            params.update({f"{method.name}.{p.name}": p.neutral for p in declared if p.neutral is not None})
    return params


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
                end = strongest_value(p) if p.neutral is not None else p.high
                start = p.high if end == p.low else p.low
                value = start + quantile * (end - start)
                params[key] = _on_grid(p, value)
            elif isinstance(p, ChoiceParam) and len(p.choices) > 1:
                if p.neutral is None:
                    params[key] = p.choices[0]
                else:
                    params[key] = strongest_value(p)
    return params


def _compresses(anchor: dict[str, Any], space: ConcreteSpace) -> bool:
    """Whether ``anchor`` moves some parameter away from its neutral value (a space of methods that
    all stay out of the anchors would otherwise enqueue the base model)."""
    return any(p.neutral is not None and f"{m.name}.{p.name}" in anchor and anchor[f"{m.name}.{p.name}"] != p.neutral
               for m, _, params in space.entries for p in params)


#: Most of the trial budget method toggles may take (rounded down).
TOGGLE_SHARE = 0.25
#: Most of the trial budget strength steps may take (rounded down), besides the toggles' share.
STEP_SHARE = 0.15
#: How far a strength step moves each compression range, as a fraction of the range's width.
STEP_SIZE = 0.15

#: User attributes of an enqueued toggle: the trial it varies and the method it leaves out (an
#: ablation) or puts in (an addition), and the trial whose fine-tuning seed it reuses (so a toggle and
#: its source differ only in that method).
ABLATION_OF, ABLATED = "ablation_of", "ablated"
ADDITION_OF, ADDED = "addition_of", "added"
SEED_OF = "seed_of"
#: the user attributes that record the source trial and the method, by whether the toggle switches
#: the method on (an addition) or off (an ablation)
TOGGLE_ATTRS = {False: (ABLATION_OF, ABLATED), True: (ADDITION_OF, ADDED)}
#: User attributes of an enqueued strength step: the trial it varies and the direction,
#: ``"stronger"`` or ``"milder"``.
STEP_OF, STEPPED = "step_of", "stepped"
STRONGER, MILDER = "stronger", "milder"
#: User attribute of a sibling: the trial whose trained model it was built from, without training
#: (its method in ``ablated`` or ``added``).
SIBLING_OF = "sibling_of"
_ORIGIN_KEYS = (*(k for keys in TOGGLE_ATTRS.values() for k in keys), STEP_OF, STEPPED, SIBLING_OF)


def is_sibling(trial) -> bool:
    """Whether ``trial`` is a sibling: built from another trial's trained model, not a trial of the budget."""
    return SIBLING_OF in trial.user_attrs


def proposal_origin(user_attrs: dict[str, Any], with_seed: bool = False) -> dict[str, Any]:
    """Where a trial came from when the search proposed it from a front member, or built it from
    another trial's model: its source trial and what was changed (``ablation_of``/``ablated``,
    ``addition_of``/``added``, ``step_of``/``stepped``, or ``sibling_of`` with ``ablated`` or
    ``added``; with ``with_seed``, also ``seed_of``); empty for any other trial."""
    keys = (*_ORIGIN_KEYS, SEED_OF) if with_seed else _ORIGIN_KEYS
    return {k: user_attrs[k] for k in keys if k in user_attrs}


class _FrontProposals(abc.ABC):
    """An Optuna callback: after each finished trial, enqueue variants of the members of the current
    feasible front, newest member first, while this kind's proposals stay within ``share`` of the
    trials finished so far (rounded up) and of ``trials`` (rounded down), and while the budget has
    room for them to run. A variant fine-tunes with its member's seed.

    Pacing them with the finished trials spreads them over the run: the front of the first few
    trials (the anchors) would otherwise use up the whole share, and the members found later, the
    better ones, would get none. Counts what it has enqueued from the study itself (the user
    attributes of every trial), so a resumed run keeps to the same cap; a setting already tried,
    failed or waiting is not enqueued again, however it is written (the space's
    :meth:`~autocomp.space.ConcreteSpace.canonical` forms are compared). Several workers on one
    storage read the study at the same time: when their trials finish at once they may pass the cap
    by one or two, or enqueue the same variant twice. A variant a stopped run did not finish is enqueued again on resume
    (:meth:`requeue_interrupted`).
    """

    #: the user attributes that mark a trial as this kind's proposal (any one of them)
    marks: tuple[str, ...] = ()

    def __init__(self, space: ConcreteSpace, trials: int, share: float):
        self.space = space
        self.share = share
        self.trials = trials
        self.budget = int(trials * share)

    def allowed(self, finished: int) -> int:
        """How many proposals of this kind a study may hold once ``finished`` trials have finished."""
        return min(self.budget, math.ceil(self.share * finished - 1e-9))  # 0.07 * 100 is 7.000000000000001

    @abc.abstractmethod
    def variants(self, member) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
        """``(user attributes, params, what changed)`` of each variant of the front member ``member``,
        in the order they are worth trying; each kind of proposal says its own."""

    def mine(self, trial) -> bool:
        return any(k in trial.user_attrs for k in self.marks)

    def requeue_interrupted(self, study) -> int:
        """Enqueue again every proposal of this kind a stop cut short (:func:`is_interrupted`);
        returns how many."""
        return _requeue_interrupted(self.space, study, self.mine)

    def __call__(self, study, trial) -> None:
        # called after every finished trial (complete, pruned or failed): each one paces the proposals
        if self.budget <= 0:
            return
        from optuna.trial import TrialState

        # an interrupted trial counts for nothing: not as finished, and a proposal (enqueued again on
        # resume) does not use up the cap twice
        trials = [t for t in study.get_trials(deepcopy=False) if not is_interrupted(t)]
        finished = sum(t.state.is_finished() and not is_sibling(t) for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        used = sum(self.mine(t) for t in trials)
        allowed = self.allowed(finished)

        def full() -> bool:  # the share is used up, or a proposal queued now would not run
            return used >= allowed or finished + waiting >= self.trials

        if full():
            return
        seen = _settings(self.space, trials)  # a failed one too: a failure is not retried
        for member in sorted(study.best_trials, key=lambda t: t.number, reverse=True):
            for attrs, params, what in self.variants(member):
                if full():
                    return
                attrs = {**attrs, SEED_OF: member.user_attrs.get(SEED_OF, member.number)}
                if _enqueue_new(self.space, study, params, attrs, seen):
                    logger.info("trial %d is on the front: queued it %s", member.number, what)
                    used += 1
                    waiting += 1


class MethodToggles(_FrontProposals):
    """Front members with one optional method toggled (see the module's docs), at most ``share`` of
    the trials. A member that is itself a toggle is not toggled back on the same method.

    A method that takes part in the anchors is put in with its mildest anchor's setting: quantization
    with every layer at the strongest precision offered. On this host a per-layer mix drawn by the
    sampler was slower than fp32 about as often as faster (benchmarks/joint_vs_single.md), while every
    layer int8 made a member 17 % faster, one validation image lower. A method that stays out of the
    anchors (block removal, low-rank) has its parameters drawn by the sampler."""

    marks = (ABLATION_OF, ADDITION_OF)

    def __init__(self, space: ConcreteSpace, trials: int, share: float = TOGGLE_SHARE):
        self.gated = [m.name for m, _, _ in space.entries if m.name in space.gated]
        self.post_export_methods = {m.name for m, _, _ in space.entries if m.stage == "post_export"}
        super().__init__(space, trials, share if self.gated else 0.0)
        #: per optional method that takes part in the anchors, the setting it is put in with: its
        #: mildest anchor's (every layer at the strongest precision offered)
        uniform = _anchor_params(space, ANCHOR_QUANTILES[0])
        self.put_in = {m.name: {k: uniform[k] for p in params
                                if (k := f"{m.name}.{p.name}") in uniform and p.name != GATE}
                       for m, _, params in space.entries if m.name in space.gated and m.in_anchors}

    def proposals(self, params: dict[str, Any]) -> list[tuple[str, bool, dict[str, Any]]]:
        """``(method, switched_on, params)`` for each optional method: left out where ``params``
        switches it on and it changes something, put in where ``params`` switches it off, or switches
        it on changing nothing (its canonical form is switched off: quantization on with every layer
        at fp32) and it has an anchor setting to bring in; everything else as in ``params``."""
        out = []
        canonical = self.space.canonical(params)
        for method in self.gated:
            gate = f"{method}.{GATE}"
            if not isinstance(params.get(gate), bool):
                continue
            rest = {k: v for k, v in params.items() if not k.startswith(f"{method}.")}
            idle = canonical.get(gate) is False
            if params[gate] and not idle:
                out.append((method, False, {**rest, gate: False}))
                continue
            added = self._sampled(self.put_in.get(method, {}), {**rest, gate: True})
            if params[gate] and not added:
                continue  # on but doing nothing (no block removed), and nothing of its own to bring in
            out.append((method, True, {**rest, gate: True, **added}))
        return out

    def post_export(self, params: dict[str, Any]) -> list[tuple[str, bool, dict[str, Any]]]:
        """The :meth:`proposals` that toggle a post-export method: a trial's siblings, built from its
        trained model without training; not the base model itself (quantization left out of
        quantization alone)."""
        return [p for p in self.proposals(params)
                if p[0] in self.post_export_methods and not self.space.builds_base_model(p[2])]

    def _sampled(self, setting: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The part of ``setting`` a trial with ``params`` samples (not the layers of a block it
        removes, nor a parameter whose ``only_if`` does not hold)."""
        kept = self.space.sampled_part({**params, **setting})
        return {k: v for k, v in setting.items() if k in kept}

    def variants(self, member) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
        came_from = {member.user_attrs.get(ABLATED), member.user_attrs.get(ADDED)}
        out = []
        for method, switched_on, params in self.proposals(member.params):
            if method in came_from:
                continue  # toggling it back would redo the member's own source
            source_key, method_key = TOGGLE_ATTRS[switched_on]
            out.append(({source_key: member.number, method_key: method}, params,
                        f"{'with' if switched_on else 'without'} {method}"))
        return out


class StrengthSteps(_FrontProposals):
    """Front members one step stronger and one step milder: every compression range the member
    sampled (a parameter with a ``neutral`` end: a pruning ratio, a rank ratio) moved ``size`` of its
    width toward its strongest end, or toward its neutral end, kept on its grid and within its range;
    every choice as the member has it (the same blocks removed, the same precisions). At most
    ``share`` of the trials.

    A local search along the front: the sampler, in a large space, settles on one region of each range
    (benchmarks/joint_vs_single.md: a mean pruning ratio near 0.33 in the second half of a joint run,
    while pruning alone found its best points at 0.5-0.66); a step asks, of each of the best
    candidates, what the same recipe gives a little harder or a little softer. The stronger step comes
    first. A member that is itself a step is not stepped back."""

    marks = (STEP_OF,)

    def __init__(self, space: ConcreteSpace, trials: int, share: float = STEP_SHARE, size: float = STEP_SIZE):
        #: the ranges with a direction, by full name
        self.ranges = {f"{m.name}.{p.name}": p for m, _, params in space.entries for p in params
                       if isinstance(p, (FloatParam, IntParam)) and p.low != p.high and p.neutral in (p.low, p.high)}
        super().__init__(space, trials, share if self.ranges else 0.0)
        self.size = size

    def steps(self, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """``(direction, params)``, stronger then milder, for each direction that changes something."""
        out = []
        for direction in (STRONGER, MILDER):
            moved = dict(params)
            for key, p in self.ranges.items():
                if key in params:
                    moved[key] = _step(p, params[key], self.size, toward_neutral=direction == MILDER)
            if any(not same_value(moved[k], params[k]) for k in params):
                out.append((direction, moved))
        return out

    def variants(self, member) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
        back = {STRONGER: MILDER, MILDER: STRONGER}.get(member.user_attrs.get(STEPPED))
        return [({STEP_OF: member.number, STEPPED: direction}, params, f"one step {direction}")
                for direction, params in self.steps(member.params) if direction != back]


def _step(p: FloatParam | IntParam, value: float, size: float, toward_neutral: bool) -> float | int:
    """``value`` moved ``size`` of ``p``'s width toward its neutral end or away from it; on a grid,
    by the nearest whole number of grid steps (halves up), at least one (a narrow range still moves)."""
    target = p.neutral if toward_neutral else strongest_value(p)
    if target == value:
        return value
    distance = size * (p.high - p.low)
    if p.step:
        # halves round up: 0.075 / 0.05 is 1.4999999999999998
        distance = max(1, math.floor(distance / p.step + 0.5 + 1e-9)) * p.step
    return _on_grid(p, value + math.copysign(distance, target - value))


def _on_grid(p: FloatParam | IntParam, value: float) -> float | int:
    """``value`` snapped to ``p``'s grid (when it has a step) and kept within its range."""
    if p.step:
        value = p.low + round((value - p.low) / p.step) * p.step
    value = min(p.high, max(p.low, round(value, 10)))
    return int(round(value)) if isinstance(p, IntParam) else value


def requeue_interrupted_anchors(space: ConcreteSpace, study) -> int:
    """Enqueue again every anchor (:func:`anchors`), or other trial enqueued from outside the
    search, that a stop cut short (:func:`is_interrupted`); returns how many. The proposals requeue
    their own (:meth:`_FrontProposals.requeue_interrupted`)."""
    return _requeue_interrupted(space, study, lambda t: not proposal_origin(t.user_attrs) and not is_sibling(t))


def _requeue_interrupted(space: ConcreteSpace, study, which: Callable[[Any], bool]) -> int:
    """Enqueue again, with its setting and origin, every enqueued trial ``which`` picks among those
    a stop cut short (:func:`_enqueue_new`); returns how many."""
    existing = study.get_trials(deepcopy=False)
    seen = _settings(space, [t for t in existing if not is_interrupted(t)])
    return sum(_enqueue_new(space, study, t.system_attrs.get("fixed_params", {}),
                            proposal_origin(t.user_attrs, with_seed=True), seen)
               for t in existing if is_interrupted(t) and which(t))


def _enqueue_new(space: ConcreteSpace, study, params: dict[str, Any], user_attrs: dict[str, Any],
                 seen: list[dict[str, Any]]) -> bool:
    """Enqueue ``params`` and add its canonical form to ``seen`` (canonical forms), unless it is
    empty (a trial the sampler drew), a trial in ``seen`` already has that setting, or it builds the
    base model itself (a toggle leaving quantization out of quantization alone, a milder step down
    to no pruning: the base model is measured apart, never a trial); returns whether it was enqueued."""
    canonical = space.canonical(params)
    if not params or _among(canonical, seen) or space.builds_base_model(params):
        return False
    study.enqueue_trial(params, user_attrs=user_attrs)
    seen.append(canonical)
    return True


def tried(space: ConcreteSpace, trials, params: dict[str, Any]) -> bool:
    """Whether one of ``trials`` (finished, running or waiting; not one a stop cut short) already
    tried the setting ``params``, however either is written (their canonical forms agree)."""
    considered = [t for t in trials if not is_interrupted(t)]
    return _among(space.canonical(params), _settings(space, considered))


def _settings(space: ConcreteSpace, trials) -> list[dict[str, Any]]:
    """The canonical forms of the settings ``trials`` tried, or will try."""
    return [space.canonical(_setting(t)) for t in trials]


def _among(canonical: dict[str, Any], seen: list[dict[str, Any]]) -> bool:
    """Whether a trial with one of the canonical settings ``seen`` already tried ``canonical``."""
    return any(_agrees(canonical, other) for other in seen)


def _setting(trial) -> dict[str, Any]:
    # a waiting (enqueued, not yet run) trial has no params yet, only the ones it was enqueued with
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def is_interrupted(trial) -> bool:
    """Whether ``trial`` failed because the run was stopped (SIGTERM, Ctrl-C; before it started,
    too: a KeyboardInterrupt), not because of its candidate. It does not use up the budget, is not
    counted as tried, and, when it was proposed or enqueued, is enqueued again on resume. A trial
    whose process died instead (killed, or crashed by its candidate; a SystemExit), failed with no
    reason recorded when a resumed run found it RUNNING (or by Optuna's heartbeats), is a failed
    trial, not retried: a candidate that crashes the process cannot crash every resume."""
    from optuna.trial import TrialState

    reason = trial.user_attrs.get("failure_reason")
    return trial.state == TrialState.FAIL and reason is not None and reason.startswith("KeyboardInterrupt")


def _agrees(fixed: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether a trial with ``params`` already tried (or will try) the setting ``fixed`` (both in
    canonical form; ``fixed`` may leave parameters to the sampler)."""
    return all(k in params and same_value(params[k], v) for k, v in fixed.items())
