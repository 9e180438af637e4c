"""The checks behind :mod:`autocomp.testing`: the contracts of ``autocomp/method.py`` and
``autocomp/target.py``, run on tiny versions of the zoo's architectures.

:func:`check_method`, for each architecture, makes the method's parameters concrete the way a
search does and applies it at three kinds of setting: every parameter at its ``neutral`` value
("mildest"), every parameter at the end away from it ("strongest"), and random draws. Each
application is checked against what the engine relies on:

- the registration is one autocomp accepts, the table parses and the parameters are well formed,
  name modules of the model (``module``, ``removes``), offer choices a study's storage keeps, and
  are the same when asked again (a resumed search asks again);
- a structural method gets a copy of the base model, a recovery method a student at half its width
  (:func:`narrow_student`: recovery runs after a structural change) with the base model as teacher;
- ``apply`` returns the model (structural, recovery) or the path of a file it wrote under
  ``ctx.work_dir`` (post-export), leaves the base model and the teacher (weights, train/eval mode,
  hooks, ``requires_grad``) and the input file as they were, and gives outputs of the base model's
  shape, all finite;
- a torch result runs and exports to ONNX faithfully; an ONNX result runs in ONNX Runtime (or, where
  the method names an evaluation twin in ``ctx.notes``, the twin does: the engine scores the twin);
- ``ctx.skip`` entries are strings (they go into the study's storage);
- ``canonical`` is stable (its own canonical form) and names only the method's parameters, and a
  canonical form that rewrites values (not one that leaves parameters out) builds the same candidate;
- where ``changes_nothing`` is true, ``apply`` really left the model as it was: the search then
  skips fine-tuning, and counts the candidate as the base model.

Each ``apply`` runs with the global torch random state seeded (``seed``) and restored afterwards.
``apply`` raising :class:`~autocomp.errors.CandidateError` is the method refusing one candidate, as
the contract allows: a figure, not a failure, unless the method refuses every setting on every
architecture. Any other exception is a failure. Figures (MACs and parameters against the base
model at the strongest setting, the artifact's accuracy on labels the base model gives itself,
so the base model scores 1.0) are reported, not judged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from autocomp import zoo
from autocomp.candidate import _model_from, _onnx_from, count_macs, recalibrate_batchnorm
from autocomp.errors import AutocompError, CandidateError, ConfigError
from autocomp.export import check_parity, export_onnx
from autocomp.method import (
    EVALUATION_ARTIFACT,
    BaseModelInfo,
    CandidateContext,
    ChoiceParam,
    FloatParam,
    IntParam,
    strongest_value,
)
from autocomp.ort import TimingPolicy, input_shapes_of, measure_latency, run_batches
from autocomp.plugins import _malformed
from autocomp.space import parse_space, same_value
from autocomp.target import PRECISIONS, STATISTICS, LatencyStats, Target
from autocomp.workload import Split, Workload

__all__ = ["DEFAULT_ARCHITECTURES", "ConformanceError", "Finding", "HostTarget", "Report", "check_method",
           "check_target", "check_workload", "narrow_student", "tiny_workload"]

#: A residual CNN, depthwise inverted residuals, a transformer encoder and a PReLU embedding network.
DEFAULT_ARCHITECTURES: tuple[str, ...] = ("resnet20", "mobilenet_v2", "vit", "mobilefacenet")


@dataclass(frozen=True)
class Finding:
    """One check (``ok`` True or False) or one figure (``ok`` None) of a conformance run."""

    where: str  # "registration", "resnet20", "resnet20 / strongest" ...
    check: str
    ok: bool | None
    detail: str = ""

    def __str__(self) -> str:
        mark = {True: "ok", False: "FAILED", None: "figure"}[self.ok]
        return f"[{mark}] {self.where}: {self.check}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Report:
    """What a conformance run checked and measured."""

    subject: str
    findings: list[Finding] = field(default_factory=list)
    #: True when a target's ``configure`` asked for options (a configuration error) and nothing
    #: else could be checked without them.
    needs_options: bool = False

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.ok is False]

    @property
    def passed(self) -> int:
        return sum(f.ok is True for f in self.findings)

    def check(self, where: str, check: str, ok: bool, detail: str = "") -> bool:
        self.findings.append(Finding(where, check, bool(ok), "" if ok else detail))
        return bool(ok)

    def figure(self, where: str, what: str, detail: str) -> None:
        self.findings.append(Finding(where, what, None, detail))

    def __str__(self) -> str:
        head = f"{self.subject}: {self.passed} checks passed, {len(self.failures)} failed"
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def raise_for_failures(self) -> "Report":
        if self.failures:
            raise ConformanceError(self)
        return self


class ConformanceError(AssertionError):
    """A plugin broke one or more of autocomp's contracts; ``report`` holds every finding."""

    def __init__(self, report: Report):
        self.report = report
        lines = [f"{report.subject} broke {len(report.failures)} of autocomp's contracts "
                 f"({report.passed} checks passed):", *(f"  {f}" for f in report.failures)]
        super().__init__("\n".join(lines))


class HostTarget(Target):
    """The stand-in target of the checks: this host, timed briefly with ONNX Runtime, offering every
    precision autocomp knows, so a method declares all the parameters it can."""

    name = "host"
    precisions = frozenset(PRECISIONS)
    description = "this host, timed briefly (conformance checks only)"

    def latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> LatencyStats:
        policy = TimingPolicy(warmup_runs=2, warmup_s=0.0, min_runs=5, min_s=0.0)
        return measure_latency(onnx_path, input_shapes, policy, target=self.name)


def tiny_workload(architecture: str = "resnet20", *, examples: int = 64, seed: int = 0) -> Workload:
    """A tiny zoo model (:func:`autocomp.zoo.tiny_kwargs`) with random inputs labelled by the model
    itself (so the base model scores 1.0 and a method's damage shows as lost accuracy), batch-norm
    statistics of its training inputs, and no test split. The same arguments give the same workload;
    the global random state is left as it was."""
    generator = torch.Generator().manual_seed(seed + 1)
    shape = zoo.input_shape(architecture, batch=examples, tiny=True)
    train, val = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    with torch.random.fork_rng(devices=[]):  # initialisation, and dropout while statistics are taken
        torch.manual_seed(seed)
        model = zoo.build(architecture, **zoo.tiny_kwargs(architecture))
        recalibrate_batchnorm(model, train, batches=1, batch_size=examples)
    model.eval()
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in (train, val)]
    return Workload(name=f"tiny-{architecture}", model=model, example_input=zoo.example_input(architecture, tiny=True),
                    train=Split(train, labels[0]), val=Split(val, labels[1]), batch_size=16)


def narrow_student(architecture: str, *, seed: int = 0, inputs: torch.Tensor | None = None) -> torch.nn.Module:
    """The tiny ``architecture`` at half its width (channels, or a transformer's dimension): a
    structurally changed student of :func:`tiny_workload`'s model, with the same outputs' shape, such
    as a recovery method gets after pruning. Batch-norm statistics come from ``inputs`` when given.
    The global random state is left as it was."""
    kwargs = zoo.tiny_kwargs(architecture)
    for key in ("width", "width_mult", "dim"):
        if key in kwargs:
            kwargs[key] = kwargs[key] / 2 if isinstance(kwargs[key], float) else max(2, kwargs[key] // 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        model = zoo.build(architecture, **kwargs)
        if inputs is not None:
            recalibrate_batchnorm(model, inputs, batches=1, batch_size=len(inputs))
    return model.eval()


def check_method(method: Any, table: Mapping[str, Any] | None = None, *, work_dir: Path | str,
                 architectures: Sequence[str] = DEFAULT_ARCHITECTURES, target: Target | None = None,
                 samples: int = 2, seed: int = 0, atol: float = 1e-4, rtol: float = 1e-3) -> Report:
    """Run ``method`` (an instance, as a plugin registers it) through autocomp's contracts on tiny
    versions of ``architectures``, with ``table`` as its table of a space file (``{}``: its
    defaults) and ``target`` (default :class:`HostTarget`) as the search's target. Files go under
    ``work_dir``. ``samples`` random settings are tried besides the mildest and the strongest one;
    ``atol`` and ``rtol`` are the tolerances of every comparison of outputs (the engine's
    export-parity defaults).

    Returns the :class:`Report`; raises :class:`ConformanceError` listing every broken contract.
    """
    name = getattr(method, "name", None)
    report = Report(f"method {name!r}")
    problem = _malformed("register_methods", (method,), {})
    if not report.check("registration", "is a method autocomp registers", problem is None, problem or ""):
        return report.raise_for_failures()
    table = {k: v for k, v in (table or {}).items() if k != "optional"}  # checked switched on
    try:
        with _quiet():  # a recovery method alone "never runs" in a search: here it does
            space = parse_space({name: table}, {name: method}, source="check_method")
    except Exception as exc:  # noqa: BLE001 - any failure is reported, with its kind
        report.check("registration", "parses its table", False, _why(exc))
        return report.raise_for_failures()
    run = _Run(method, space.methods[0][1], target if target is not None else HostTarget(), report, atol, rtol)
    built = 0
    for architecture in architectures:
        with _quiet():
            built += _check_on(run, space, tiny_workload(architecture, seed=seed), Path(work_dir) / architecture,
                               samples, seed)
    report.check("all", "builds a candidate", built > 0 or not architectures,
                 "no setting on any architecture built a candidate")
    return report.raise_for_failures()


@dataclass(frozen=True)
class _Run:
    """What every check of one :func:`check_method` call shares."""

    method: Any
    config: Any
    target: Target
    report: Report
    atol: float
    rtol: float


@dataclass(frozen=True)
class _Case:
    """One application of the method: where it is reported, its setting, and whether a recovery
    method gets the full-width model rather than the narrow student."""

    where: str
    setting: Mapping[str, Any]
    work: Path
    full_width: bool = False


def _check_on(run: _Run, space, wl: Workload, work: Path, samples: int, seed: int) -> int:
    """Every check on one architecture; how many candidates were built."""
    report, arch = run.report, wl.name.removeprefix("tiny-")
    fp32 = export_onnx(wl.model, wl.example_input, work / "base.onnx")
    info = BaseModelInfo(wl.model, wl.example_input, fp32, run.target)
    try:
        concrete = space.concrete(info)
    except Exception as exc:  # noqa: BLE001
        report.check(arch, "declares well-formed parameters", False, _why(exc))
        return 0
    params = concrete.entries[0][2]
    modules = {name for name, _ in wl.model.named_modules(remove_duplicate=False)}
    modules |= {name for name, _ in wl.model.named_parameters(remove_duplicate=False)}
    stray = [f"{p.name} ({field}={path!r})" for p in params for field, path in (("module", p.module),
             ("removes", p.removes)) if path is not None and path not in modules]
    report.check(arch, "its parameters' module and removes name parts of the model", not stray,
                 f"{', '.join(stray[:3])}: not a module or parameter of the model (a dotted path), so a removal "
                 "never skips them")
    odd = [p.name for p in params if isinstance(p, ChoiceParam)
           and not all(c is None or isinstance(c, (bool, int, float, str)) for c in p.choices)]
    report.check(arch, "its choices are None, bool, int, float or str", not odd,
                 f"{', '.join(odd[:3])}: the study's storage keeps only those (a tuple comes back as a list)")
    try:
        again = space.concrete(info).entries[0][2]
        report.check(arch, "declares the same parameters when asked again (a resumed search asks again)",
                     again == params, "the second call to parameters() gave other parameters")
    except Exception as exc:  # noqa: BLE001
        report.check(arch, "declares the same parameters when asked again (a resumed search asks again)", False,
                     _why(exc))
    if run.method.stage == "recovery":
        report.figure(arch, "student", "the model at half its width, the teacher at full width")
    report.figure(arch, "parameters", f"{len(params)}: " + ", ".join(p.name for p in params[:6])
                  + (" ..." if len(params) > 6 else ""))
    base = _Base(wl, fp32, seed)
    declared = {p.name for p in params}
    cases = [_Case(f"{arch} / {label}", setting, work / label) for label, setting in _settings(concrete, samples, seed)]
    if run.method.stage == "recovery":  # after a structural change, and at full width (after quantization only)
        first = cases[0]
        cases.append(_Case(f"{first.where}, full width", first.setting, first.work.with_name(f"{first.work.name}-full"),
                           full_width=True))
    built = 0
    for case in cases:
        result = _check_case(run, case, base)
        if not base.untouched():  # the next settings start from the base model again
            base = _Base(tiny_workload(arch, seed=seed), fp32, seed)
        if result is None:
            continue
        built += 1
        _check_canonical(run, case, declared, result, base)
        if case.where.endswith(" / strongest") and run.method.stage == "structural":
            try:
                macs, n = count_macs(result.model, wl.example_input)
                report.figure(case.where, "cost against the base model",
                              f"MACs x{macs / base.macs[0]:.3f}, parameters x{n / base.macs[1]:.3f}")
            except Exception as exc:  # noqa: BLE001 - torch-pruning's counter may not know a custom layer
                report.figure(case.where, "cost against the base model", f"not counted ({_why(exc)})")
        report.figure(case.where, "accuracy (base model 1.0)", f"{result.accuracy:.3f}")
    return built


@dataclass
class _Base:
    """The base model of one architecture, what it gives and what it must still hold afterwards."""

    wl: Workload
    onnx: Path
    seed: int

    def __post_init__(self) -> None:
        self.state = {k: v.detach().clone() for k, v in self.wl.model.state_dict().items()}
        self.flags = _flags(self.wl.model)
        self.onnx_sha = _sha(self.onnx)
        with torch.no_grad():
            self.outputs = self.wl.model(self.wl.val.inputs).numpy()
        self.onnx_outputs = run_batches(self.onnx, self.wl.val.inputs.numpy())
        self.macs = count_macs(self.wl.model, self.wl.example_input)

    def untouched(self) -> bool:
        now = self.wl.model.state_dict()
        return now.keys() == self.state.keys() and all(
            now[k].shape == v.shape and torch.equal(now[k], v) for k, v in self.state.items()
        ) and _flags(self.wl.model) == self.flags


#: A module's hook registries: a hook left in any of them changes what the model does or saves.
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")
#: torch's hooks on every module at once (``register_module_forward_hook`` and the like).
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


def _flags(model: torch.nn.Module) -> list[tuple]:
    """What a method may leave behind on the teacher besides its weights: train/eval mode, hooks on
    its modules, on its weights and on every module (torch's global ones), ``requires_grad``."""
    from torch.nn.modules import module as torch_module

    everywhere = tuple(len(getattr(torch_module, name, None) or ()) for name in _GLOBAL_HOOKS)
    return [everywhere, *((name, m.training, *(len(getattr(m, hooks, None) or ()) for hooks in _MODULE_HOOKS),
                           [(p.requires_grad, len(p._backward_hooks or ()),
                             len(getattr(p, "_post_accumulate_grad_hooks", None) or ()))
                            for p in m.parameters(recurse=False)])
                          for name, m in model.named_modules())]


@dataclass
class _Built:
    """One candidate a method built: its outputs on the validation inputs, and the model or file."""

    outputs: np.ndarray
    accuracy: float
    model: Any = None
    path: Path | None = None
    #: What the candidate is "the model as it was" against: the outputs and parameter shapes of the
    #: model or file the method was given.
    reference: np.ndarray | None = None
    shapes: list | None = None


def _apply(run: _Run, subject: Any, case: _Case, ctx: CandidateContext) -> tuple[Any, bool]:
    """``method.apply`` with its exceptions sorted: (what it returned, whether it returned). The
    global torch random state is seeded with ``ctx.seed`` and restored afterwards, as trials seed it."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            return run.method.apply(subject, dict(case.setting), run.config, ctx), True
    except CandidateError as exc:
        run.report.figure(case.where, "refused this candidate (CandidateError)", str(exc))
    except Exception as exc:  # noqa: BLE001
        run.report.check(case.where, "apply raises only CandidateError", False, _why(exc))
    return None, False


def _check_case(run: _Run, case: _Case, base: _Base) -> _Built | None:
    """The checks of one application of the method; the candidate, or None when none was built."""
    return (_check_onnx if run.method.stage == "post_export" else _check_torch)(run, case, base)


def _check_torch(run: _Run, case: _Case, base: _Base) -> _Built | None:
    """A structural or recovery method, applied to a copy of the base model (structural) or to a
    narrower student (recovery, which runs after a structural change; or to the copy at full width)."""
    wl, report, where = base.wl, run.report, case.where
    ctx = _context(wl, run.target, case.work, base.seed)
    if run.method.stage == "recovery" and not case.full_width:
        subject = narrow_student(wl.name.removeprefix("tiny-"), seed=base.seed, inputs=wl.train.inputs)
    else:
        subject = copy.deepcopy(wl.model).eval()
    with torch.no_grad():
        reference = subject(wl.val.inputs).numpy()
    shapes = [p.shape for p in subject.parameters()]
    result, returned = _apply(run, subject, case, ctx)
    report.check(where, "leaves the base model and the teacher as they were", base.untouched(),
                 "apply changed ctx.teacher (the base model): its weights, its train/eval mode, its hooks or "
                 "requires_grad; work on the model it is given, a copy, and remove any hook it adds")
    if not returned:
        return None
    try:
        model = _model_from(run.method, result)  # the engine's own check
    except CandidateError as exc:
        report.check(where, "returns the model", False, str(exc))
        return None
    report.check(where, "returns the model", True)
    model.eval()
    try:
        with torch.no_grad():
            out = model(wl.val.inputs)
        outputs = out.numpy() if isinstance(out, torch.Tensor) else None
    except Exception as exc:  # noqa: BLE001
        report.check(where, "its model runs on the base model's inputs, giving one tensor", False, _why(exc))
        return None
    if not report.check(where, "its model runs on the base model's inputs, giving one tensor", outputs is not None,
                        f"its forward returned {type(out).__name__}"):
        return None
    if not _outputs_ok(outputs, base, report, where):
        return None
    _check_skips(ctx, report, where)
    try:
        path = export_onnx(model, wl.example_input, case.work / "model.onnx")
        check_parity(model, path, wl.val.inputs, atol=run.atol, rtol=run.rtol)
        report.check(where, "exports to ONNX and agrees with its export", True)
    except AutocompError as exc:
        report.check(where, "exports to ONNX and agrees with its export", False, str(exc))
    return _Built(outputs, _accuracy(outputs, wl), model=model, reference=reference, shapes=shapes)


def _check_onnx(run: _Run, case: _Case, base: _Base) -> _Built | None:
    """A post-export method, applied to the base model's fp32 export."""
    wl, report, where = base.wl, run.report, case.where
    ctx = _context(wl, run.target, case.work, base.seed)
    given = ctx.work_dir / "fp32.onnx"  # where a trial's export is: inside its work directory
    given.write_bytes(base.onnx.read_bytes())
    result, returned = _apply(run, given, case, ctx)
    report.check(where, "leaves the input ONNX file as it was", _sha(given) == base.onnx_sha,
                 f"apply changed the file it was given ({given.name}): write new files under ctx.work_dir, "
                 "named apart from it")
    if not returned:
        return None
    try:
        path = _onnx_from(run.method, result).resolve()  # the engine's own check
    except CandidateError as exc:
        report.check(where, "returns the path of the ONNX file it wrote", False, str(exc))
        return None
    report.check(where, "returns the path of the ONNX file it wrote", True)
    report.check(where, "writes its file under ctx.work_dir", path.is_relative_to(ctx.work_dir.resolve()),
                 f"apply returned {path}, neither the file it was given nor one under ctx.work_dir ({ctx.work_dir})")
    twin = ctx.notes.get(EVALUATION_ARTIFACT)
    evaluated = path if twin is None else twin  # the engine scores the twin where there is one
    what = "its file" if twin is None else "its evaluation twin (ctx.notes)"
    try:
        outputs = run_batches(evaluated, wl.val.inputs.numpy())
    except (CandidateError, OSError, TypeError) as exc:
        report.check(where, f"{what} runs in ONNX Runtime", False, _why(exc))
        return None
    report.check(where, f"{what} runs in ONNX Runtime", True)
    if not _outputs_ok(outputs, base, report, where):
        return None
    _check_skips(ctx, report, where)
    return _Built(outputs, _accuracy(outputs, wl), path=path, reference=base.onnx_outputs)


def _check_canonical(run: _Run, case: _Case, declared: set[str], built: _Built, base: _Base) -> None:
    """``canonical`` stable and naming only the method's parameters; a canonical form that only
    rewrites values builds the same candidate (one that leaves parameters out need not be a setting
    ``apply`` takes: the engine compares canonical forms, it does not apply them);
    ``changes_nothing`` true only where the candidate is the model it was given."""
    method, config, report, where, setting = run.method, run.config, run.report, case.where, case.setting
    try:
        canonical = dict(method.canonical(dict(setting), config))
        again = dict(method.canonical(dict(canonical), config))
        nothing = bool(method.changes_nothing(dict(canonical), config))
    except Exception as exc:  # noqa: BLE001 - the engine logs it and takes the setting as written
        report.check(where, "canonical() and changes_nothing() run", False, _why(exc))
        return
    stable = again.keys() == canonical.keys() and all(same_value(again[k], canonical[k]) for k in canonical)
    report.check(where, "canonical() is its own canonical form", stable, f"{canonical} became {again}")
    report.check(where, "canonical() names only the method's parameters", set(canonical) <= declared,
                 f"{sorted(set(canonical) - declared)} are not parameters it declared (short names, without "
                 f"'{method.name}.')")
    if canonical.keys() == setting.keys() and not all(same_value(canonical[k], setting[k]) for k in setting):
        report.figure(where, "canonical form", str(canonical))
        rebuilt = dataclasses.replace(run, report=Report("canonical"))
        again_built = _check_case(rebuilt, dataclasses.replace(case, setting=canonical, work=case.work / "canonical"),
                                  base)
        why = "; ".join(str(f) for f in rebuilt.report.failures) or "it gives other outputs"
        report.check(where, "its canonical form builds the same candidate",
                     again_built is not None and _close(again_built.outputs, built.outputs, run.atol, run.rtol),
                     f"the canonical form {canonical} of {dict(setting)}: {why}")
    if nothing:
        same_shapes = built.model is None or [p.shape for p in built.model.parameters()] == built.shapes
        report.check(where, "changes_nothing() is true only where apply leaves the model as it was",
                     same_shapes and _close(built.outputs, built.reference, run.atol, run.rtol),
                     "changes_nothing() says this setting changes nothing, but the candidate differs from the base "
                     "model; the search would then skip fine-tuning it and count it as the base model")


def _settings(concrete, samples: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """("mildest", ...), ("strongest", ...) and ``samples`` random settings of the one method in
    ``concrete``, each sampled through an Optuna trial the way a search samples it, duplicates dropped."""
    import optuna

    method, _, params = concrete.entries[0]
    directed = [p for p in params if p.neutral is not None]
    mildest = {f"{method.name}.{p.name}": p.neutral for p in directed}
    strongest = {f"{method.name}.{p.name}": strongest_value(p) for p in directed
                 if isinstance(p, (FloatParam, IntParam, ChoiceParam))}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        study.enqueue_trial(mildest)
        study.enqueue_trial(strongest)
        labels = ["mildest", "strongest", *(f"random {i + 1}" for i in range(samples))]
        found: list[tuple[str, dict[str, Any]]] = []
        for label in labels:
            setting = dict(concrete.sample(study.ask()).settings.get(method.name, {}))
            if all(setting != s for _, s in found):
                found.append((label, setting))
        return found
    finally:
        optuna.logging.set_verbosity(verbosity)


def check_target(target: Any, options: Mapping[str, Any] | None = None, *, work_dir: Path | str,
                 architecture: str = "resnet20") -> Report:
    """Run ``target`` (an instance, as a plugin registers it) through autocomp's contracts: its
    registration and precisions, ``configure(options)`` (the options a user gives on the command
    line, ``{}`` by default), then, on the configured target, latency statistics of a tiny model's
    fp32 export (well-formed, measured or predicted as the target says), ``predict_latency``,
    ``facts`` (JSON for the run manifest), and a :class:`~autocomp.errors.CandidateError` for a file
    that is not a model. Files go under ``work_dir``.

    Returns the :class:`Report`; raises :class:`ConformanceError` listing every broken contract.
    """
    report = Report(f"target {getattr(target, 'name', None)!r}")
    problem = _malformed("register_targets", (target,), {})
    if not report.check("registration", "is a target autocomp registers", problem is None, problem or ""):
        return report.raise_for_failures()
    precisions = getattr(target, "precisions", None)
    report.check("registration", "declares its precisions", isinstance(precisions, (set, frozenset)) and bool(
        precisions) and set(precisions) <= set(PRECISIONS),
        f"precisions is {precisions!r}; a non-empty frozenset of {', '.join(PRECISIONS)}")
    options = dict(options or {})
    try:
        configured = target.configure(options)
    except Exception as exc:  # noqa: BLE001
        report.check("configure", f"configure({options}) returns a target", False,
                     f"{_why(exc)} (a target that needs options is checked with check_target(target, options))")
        # a configuration error (TargetError among them) and nothing else wrong: it needs options
        report.needs_options = isinstance(exc, ConfigError) and len(report.failures) == 1
        return report.raise_for_failures()
    if not report.check("configure", f"configure({options}) returns a target", isinstance(configured, Target),
                        f"it returned {configured!r}"):
        return report.raise_for_failures()
    target = configured
    wl = tiny_workload(architecture)
    work = Path(work_dir)
    fp32 = export_onnx(wl.model, wl.example_input, work / "model.onnx")
    shapes = input_shapes_of(wl.example_input)
    try:
        stats = target.latency(fp32, shapes)
    except Exception as exc:  # noqa: BLE001
        report.check("latency", "gives latency statistics of a tiny model", False, _why(exc))
    else:
        if report.check("latency", "gives latency statistics of a tiny model", isinstance(stats, LatencyStats),
                        f"latency() returned {type(stats).__name__}, not autocomp.LatencyStats"):
            report.check("latency", "p50 > 0 and p90 >= p50", stats.p50_ms > 0 and stats.p90_ms >= stats.p50_ms,
                         f"p50 {stats.p50_ms} ms, p90 {stats.p90_ms} ms")
            report.check("latency", "says measured or predicted as the target does",
                         stats.measured == target.measured,
                         f"the statistics say measured={stats.measured}, the target measured={target.measured}")
            try:
                [stats.value(statistic) for statistic in STATISTICS]
                report.check("latency", "gives every statistic a search optimises", True)
            except ValueError as exc:
                report.check("latency", "gives every statistic a search optimises", False,
                             f"{exc} (a measurement sets min_ms, the fastest run: --latency-statistic min is the "
                             "default)")
            try:
                json.dumps(stats.to_dict())
                report.check("latency", "its statistics are JSON (the latency cache stores them)", True)
            except (TypeError, ValueError) as exc:
                report.check("latency", "its statistics are JSON (the latency cache stores them)", False, _why(exc))
            report.figure("latency", "p50 of the tiny model", f"{stats.p50_ms:.4f} ms ({stats.runs} runs)")
    try:
        predicted = target.predict_latency(fp32, shapes)
        report.check("predict_latency", "returns None or a positive number of ms", predicted is None or (
            isinstance(predicted, (int, float)) and math.isfinite(predicted) and predicted > 0),
            f"it returned {predicted!r}")
    except Exception as exc:  # noqa: BLE001
        report.check("predict_latency", "returns None or a positive number of ms", False, _why(exc))
    try:
        facts = target.facts()  # the run manifest writes them, values it cannot write as text
        report.check("facts", "facts() is a dict", isinstance(facts, dict), f"it returned {facts!r}")
    except Exception as exc:  # noqa: BLE001
        report.check("facts", "facts() is a dict", False, _why(exc))
    broken = work / "not-a-model.onnx"
    broken.write_bytes(b"this is not an ONNX model")
    try:
        target.latency(broken, shapes)
        report.check("latency", "raises CandidateError for a file that is not a model", False,
                     "latency() returned statistics for a file that is not a model")
    except CandidateError:
        report.check("latency", "raises CandidateError for a file that is not a model", True)
    except Exception as exc:  # noqa: BLE001
        report.check("latency", "raises CandidateError for a file that is not a model", False,
                     f"{_why(exc)}; a model the target cannot run fails its trial with a CandidateError")
    return report.raise_for_failures()


def check_workload(workload: Any, *, work_dir: Path | str) -> Report:
    """Run a workload through autocomp's contracts: ``workload`` is a :class:`~autocomp.Workload`
    or the function a plugin registers (or ``--workload module:function`` names), which is then
    called twice and must give the same model and validation data (a resumed search calls it
    again and refuses other ones). Checked: the model runs on its validation inputs giving one
    output per example, exports to ONNX and agrees with its export (the base model is measured as
    its export), the metric gives a number on the export's outputs, and the loss is a scalar the
    recovery methods can train on. Files go under ``work_dir``.

    Returns the :class:`Report`; raises :class:`ConformanceError` listing every broken contract.
    """
    from autocomp.workload import fingerprint

    report = Report(f"workload {getattr(workload, 'name', getattr(workload, '__name__', workload))!r}")
    factory = None if isinstance(workload, Workload) else workload
    if factory is not None:
        wl = _made(factory, report, "returns a Workload")
        if wl is None:
            return report.raise_for_failures()
        again = _made(factory, report, "returns a Workload when called again")
        if again is not None:
            first, second = fingerprint(wl), fingerprint(again)
            changed = [part for part, digest in first.items() if second[part] != digest]
            if "model" in changed and _same_outputs(wl.model, again.model, wl.val.inputs[:64]):
                changed.remove("model")  # trained again, equal within float noise: a resume accepts it too
            report.check("factory", "gives the same model and validation data on every call", not changed,
                         f"a second call gave another {' and '.join(changed)}: load saved weights and seed any "
                         "random split (a resumed search calls it again and refuses another model)")
        report.subject = f"workload {wl.name!r}"
    else:
        wl = workload
    inputs = wl.val.inputs[:64]
    try:
        with torch.no_grad():
            out = wl.model.eval()(inputs)
        ok = isinstance(out, torch.Tensor) and out.shape[:1] == inputs.shape[:1]
        detail = f"its forward returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))} for {len(inputs)} examples"
    except Exception as exc:  # noqa: BLE001
        ok, detail = False, _why(exc)
    if not report.check("model", "runs on its validation inputs, giving one output per example", ok, detail):
        return report.raise_for_failures()
    try:
        path = export_onnx(wl.model, wl.example_input, Path(work_dir) / "model.onnx")
        check_parity(wl.model, path, inputs)
        report.check("model", "exports to ONNX and agrees with its export", True)
    except AutocompError as exc:
        report.check("model", "exports to ONNX and agrees with its export", False, str(exc))
        return report.raise_for_failures()
    try:
        value = wl.metric(run_batches(path, wl.val.inputs.numpy()), wl.val.targets.numpy())
        try:
            number = float(value)  # what the engine does with it
        except (TypeError, ValueError):
            number = math.nan
        report.check("metric", "gives a number on the export's outputs", math.isfinite(number), f"it gave {value!r}")
        if math.isfinite(number):
            report.figure("metric", f"{wl.metric_name} on the validation split", f"{number:.4f}")
    except Exception as exc:  # noqa: BLE001
        report.check("metric", "gives a number on the export's outputs", False, _why(exc))
    try:
        student = copy.deepcopy(wl.model).train()
        trainable = any(p.requires_grad for p in student.parameters())
        n = min(len(wl.train), wl.batch_size)
        with torch.random.fork_rng(devices=[]):  # dropout
            loss = wl.compute_loss(student(wl.train.inputs[:n]), wl.train.targets[:n])
        ok = isinstance(loss, torch.Tensor) and loss.numel() == 1 and bool(torch.isfinite(loss).all())
        if ok and trainable:
            ok = loss.requires_grad
            loss.sum().backward()
        report.check("loss", "is a scalar the recovery methods can train on", ok,
                     f"compute_loss gave {loss!r}" + ("" if trainable else " (the model has no trainable parameter)"))
    except Exception as exc:  # noqa: BLE001
        report.check("loss", "is a scalar the recovery methods can train on", False, _why(exc))
    report.figure("splits", "examples", ", ".join(f"{which} {len(split)}" for which, split in
                                                  (("train", wl.train), ("val", wl.val), ("test", wl.test))
                                                  if split is not None))
    return report.raise_for_failures()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, inputs: torch.Tensor) -> bool:
    with torch.no_grad():
        x, y = a.eval()(inputs), b.eval()(inputs)
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and _close(x.numpy(), y.numpy(), 1e-4, 1e-3)


def _made(factory, report: Report, check: str) -> Workload | None:
    try:
        with torch.random.fork_rng(devices=[]):  # a factory that trains may seed torch
            made = factory()
    except Exception as exc:  # noqa: BLE001
        report.check("factory", check, False, _why(exc))
        return None
    report.check("factory", check, isinstance(made, Workload), f"it returned {type(made).__name__}")
    return made if isinstance(made, Workload) else None


def _context(wl: Workload, target: Target, work: Path, seed: int) -> CandidateContext:
    work.mkdir(parents=True, exist_ok=True)
    return CandidateContext(workload=wl, teacher=wl.model, target=target, work_dir=work, seed=seed)


def _outputs_ok(outputs: np.ndarray, base: _Base, report: Report, where: str) -> bool:
    return report.check(where, "keeps the output's shape", outputs.shape == base.outputs.shape,
                        f"outputs {outputs.shape}, the base model's {base.outputs.shape}") and report.check(
        where, "gives finite outputs", bool(np.isfinite(outputs).all()), "NaN or infinite outputs")


def _check_skips(ctx: CandidateContext, report: Report, where: str) -> None:
    report.check(where, "ctx.skip entries are (method, what, why) strings", all(
        isinstance(s, tuple) and len(s) == 3 and all(isinstance(x, str) for x in s) for s in ctx.skipped),
        f"ctx.skipped holds {ctx.skipped!r}; call ctx.skip(self.name, what, why) with strings")


def _accuracy(outputs: np.ndarray, wl: Workload) -> float:
    return float(wl.metric(outputs, wl.val.targets.numpy()))


def _close(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's and torch-pruning's notices, and autocomp's warnings about a search, are not
    findings."""
    import logging
    import warnings

    logger = logging.getLogger("autocomp")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
