"""Method ``distill``: recovery by fine-tuning with knowledge distillation from the base model.

Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * task loss
       + feature_weight * feature loss.

``alpha = 0`` is plain fine-tuning. Without feature distillation, teacher outputs on the training
split are computed once per process (the teacher never changes), so distillation costs no more
than fine-tuning.

Feature distillation (FitNets, Romero et al., 2015) is on when ``features`` names layers and
``feature_weight`` > 0: the outputs of those layers in student and teacher are taken with forward
hooks on every batch (the teacher runs under ``no_grad`` beside the student). Where pruning changed
a feature's channel count, a linear map over the channel dimension (a 1x1 convolution for feature
maps) learns, together with the student, to map student channels to teacher channels; it lives only
inside :func:`distill` and is thrown away, so the exported model is unchanged. The feature loss is the
squared distance between the L2-normalized flattened features, averaged over layers (0 to 4).

``features = "auto"`` takes the output of the last block of each stage of the teacher: blocks are
the modules with an ``is_shape_preserving`` method (the zoo's and digits' residual blocks) or, in a
model without any, the children of its longest ``nn.Sequential`` / ``nn.ModuleList``; a stage is a
run of consecutive blocks (in execution order) whose outputs have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from autocomp.errors import CandidateError, SpaceError
from autocomp.hookspecs import hookimpl
from autocomp.method import BaseModelInfo, CandidateContext, FloatParam, IntParam, Method, Param, parse_range

__all__ = ["DistillConfig", "DistillMethod", "distill", "stage_outputs"]


@dataclass(frozen=True)
class DistillConfig:
    """``[distill]`` table. Ranges are sampled, single numbers are fixed."""

    temperature: tuple[float, float] = (1.0, 8.0)
    alpha: tuple[float, float] = (0.0, 0.9)
    steps: tuple[int, int] = (150, 150)
    lr: float = 0.01
    batch_size: int = 64
    #: Module paths whose outputs are distilled, or "auto" (last block of each stage).
    features: tuple[str, ...] | str = ()
    #: Weight of the feature loss; 0 turns feature distillation off.
    feature_weight: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for key, kind, low, high in (("temperature", float, 0.1, 100.0), ("alpha", float, 0.0, 1.0),
                                     ("steps", int, 0, 1_000_000), ("feature_weight", float, 0.0, 1000.0)):
            value = getattr(self, key)
            object.__setattr__(self, key, parse_range(list(value) if isinstance(value, tuple) else value,
                                                      key=key, source="", section="distill", kind=kind,
                                                      low=low, high=high))
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < 10):
            raise SpaceError(f"lr must lie in (0, 10), got {lr!r}", key="distill.lr")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SpaceError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}", key="distill.batch_size")
        features = self.features
        if isinstance(features, list):
            features = tuple(features)
        if not (features == "auto" or isinstance(features, tuple) and len(set(features)) == len(features)
                and all(isinstance(f, str) and f for f in features)):
            raise SpaceError(f'features must be a list of distinct module paths or "auto", got {self.features!r}',
                             key="distill.features")
        object.__setattr__(self, "features", features)
        if self.feature_weight[1] > 0 and not features:
            raise SpaceError(f"feature_weight {list(self.feature_weight)} needs layers to distill: set features "
                             'to module paths or "auto"', key="distill.feature_weight")


#: The teacher's logits on one training split: (teacher, inputs, logits). Holding the two objects
#: (not their ids) means a new teacher can never be mistaken for a collected one.
_teacher_cache: list[tuple[Any, Any, Any]] = []


def _teacher_outputs(teacher, inputs, batch_size: int = 256):
    import torch

    if not (_teacher_cache and _teacher_cache[0][0] is teacher and _teacher_cache[0][1] is inputs):
        with torch.no_grad():
            teacher.eval()
            logits = torch.cat([teacher(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
        _teacher_cache[:] = [(teacher, inputs, logits)]
    return _teacher_cache[0][2]


def stage_outputs(model, example_input) -> list[str]:
    """Paths of the last block of each stage of ``model`` (the ``"auto"`` rule in the module docstring)."""
    import torch
    import torch.nn as nn

    named = list(model.named_modules())
    blocks = [n for n, m in named if n and callable(getattr(m, "is_shape_preserving", None))]
    blocks = [n for n in blocks if not any(n.startswith(b + ".") for b in blocks)]  # outermost only
    if not blocks:
        containers = [(n, m) for n, m in named if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2]
        if not containers:
            return []
        prefix, longest = max(containers, key=lambda nm: len(nm[1]))
        blocks = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(longest))]
    modules = dict(named)
    order: list[tuple[str, tuple[int, ...], Any]] = []  # (block, output shape, output), as run

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                order.append((name, tuple(output.shape[1:]), output))  # kept alive: compared by identity
        return hook

    hooks = [modules[name].register_forward_hook(record(name)) for name in blocks]
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # a block whose output is the model's output is left to the soft labels
    ends = [name for (name, shape, out), (_, after, _) in zip(order, order[1:] + [("", None, None)])
            if shape != after and out is not output]
    return list(dict.fromkeys(ends))


class _FeatureTaps:
    """Forward hooks on the distilled layers of student and teacher, and the adapters between them."""

    def __init__(self, student, teacher, paths: Sequence[str], probe, skip: Callable[[str, str], None]):
        import torch

        self.student_out: dict[str, Any] = {}
        self.teacher_out: dict[str, Any] = {}
        self.hooks: list = []
        self.adapters: dict[str, Any] = {}  # path -> (Linear, dim) for features whose channels differ
        student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
        for path in paths:
            if path not in teacher_modules:
                skip(path, "no such layer in the base model")
            elif path not in student_modules:
                skip(path, "not in the student (removed by an earlier method)")
        paths = [p for p in paths if p in teacher_modules and p in student_modules]
        for path in paths:
            self.hooks.append(student_modules[path].register_forward_hook(self._keep(self.student_out, path)))
            self.hooks.append(teacher_modules[path].register_forward_hook(self._keep(self.teacher_out, path)))
        was_training = student.training
        with torch.no_grad():
            student.eval()(probe)
            teacher.eval()(probe)
        student.train(was_training)
        self.paths = []
        for path in paths:
            s, t = self.student_out.get(path), self.teacher_out.get(path)
            if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
                skip(path, "the layer's output is not a tensor (or the layer did not run)")
                continue
            differ = [d for d in range(1, s.ndim) if s.shape[d] != t.shape[d]] if s.ndim == t.ndim else None
            if differ is None or len(differ) > 1:
                skip(path, f"student feature {tuple(s.shape[1:])} cannot be mapped to the teacher's {tuple(t.shape[1:])}")
                continue
            if differ:
                d = differ[0]
                self.adapters[path] = (torch.nn.Linear(s.shape[d], t.shape[d], bias=False), d)
            self.paths.append(path)
        self.student_out.clear()
        self.teacher_out.clear()

    @staticmethod
    def _keep(store: dict, path: str):
        def hook(module, inputs, output):
            # a copy: a later in-place op (ReLU(inplace=True)) must not change what was taken
            store[path] = output.clone() if hasattr(output, "clone") else output
        return hook

    def parameters(self) -> list:
        return [p for adapter, _ in self.adapters.values() for p in adapter.parameters()]

    def loss(self):
        """Mean over layers of |normalize(adapt(student)) - normalize(teacher)|^2, per example."""
        import torch.nn.functional as F

        total = 0.0
        for path in self.paths:
            s, t = self.student_out.pop(path), self.teacher_out.pop(path)
            if path in self.adapters:
                adapter, dim = self.adapters[path]
                s = adapter(s.movedim(dim, -1)).movedim(-1, dim)
            diff = F.normalize(s.flatten(1), dim=1) - F.normalize(t.flatten(1), dim=1)
            total = total + diff.pow(2).sum(1).mean()
        return total / len(self.paths)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def distill(student, teacher, workload, *, temperature: float, alpha: float, steps: int, lr: float,
            batch_size: int, seed: int, features: Sequence[str] = (), feature_weight: float = 0.0,
            skip: Callable[[str, str], None] | None = None, notes: dict[str, Any] | None = None):
    """Fine-tune ``student`` in place for ``steps`` minibatches; returns it in eval mode.

    With ``features`` and ``feature_weight`` > 0 the outputs of those layers are distilled too;
    layers that cannot be (missing in the student, shapes that cannot be mapped) are passed to
    ``skip(path, why)``. ``notes`` receives the layers used and the feature loss over the first and
    last tenth of the steps. Raises :class:`CandidateError` when the loss diverges.
    """
    import torch
    import torch.nn.functional as F

    if steps <= 0:
        return student.eval()
    train = workload.train
    generator = torch.Generator().manual_seed(seed)
    taps = None
    if feature_weight > 0 and features:
        taps = _FeatureTaps(student, teacher, features, train.inputs[:2], skip or (lambda what, why: None))
        if not taps.paths:
            taps.remove()
            taps = None
    # Without feature taps the teacher's logits never change: compute them once.
    soft_targets = _teacher_outputs(teacher, train.inputs) if alpha > 0 and taps is None else None
    params = [p for p in student.parameters() if p.requires_grad] + (taps.parameters() if taps else [])
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    feature_losses: list[float] = []
    teacher.eval()
    student.train()
    perm = torch.randperm(len(train), generator=generator)
    pos = 0
    try:
        for _ in range(steps):
            if pos + batch_size > len(train):
                perm, pos = torch.randperm(len(train), generator=generator), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            inputs = train.inputs[idx]
            out = student(inputs)
            loss = workload.compute_loss(out, train.targets[idx]) * (1 - alpha)
            teacher_logits = soft_targets[idx] if soft_targets is not None else None
            if taps is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                feature_loss = taps.loss()
                feature_losses.append(float(feature_loss.detach()))
                loss = loss + feature_weight * feature_loss
            if alpha > 0:
                t = temperature
                kd = F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                              reduction="batchmean", log_target=True)
                loss = loss + alpha * t * t * kd
            if not torch.isfinite(loss):
                raise CandidateError(f"fine-tuning diverged (loss {float(loss)}); lower [distill] lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        if taps is not None:
            taps.remove()
        student.zero_grad(set_to_none=True)
    if notes is not None and taps is not None:
        tenth = max(1, len(feature_losses) // 10)
        notes["distill_features"] = list(taps.paths)
        notes["distill_feature_loss"] = {"first": sum(feature_losses[:tenth]) / tenth,
                                         "last": sum(feature_losses[-tenth:]) / tenth}
    return student.eval()


class DistillMethod(Method):
    name = "distill"
    stage = "recovery"
    config_type = DistillConfig
    description = ("fine-tuning with soft-label distillation from the base model (temperature, alpha, steps), "
                   "optionally of intermediate features")

    def parameters(self, config: DistillConfig, base: BaseModelInfo) -> Sequence[Param]:
        t, a, s = config.temperature, config.alpha, config.steps
        params: list[Param] = [FloatParam("temperature", *t), FloatParam("alpha", *a), IntParam("steps", *s)]
        if config.features and config.feature_weight[1] > 0:
            if config.features != "auto":
                modules = dict(base.model.named_modules())
                missing = [f for f in config.features if f not in modules]
                if missing:
                    examples = ", ".join(n for n in list(modules)[1:4])
                    raise SpaceError(f"no module {', '.join(map(repr, missing))} in the model; features are "
                                     f"dotted module paths such as {examples}", key="distill.features")
            params.append(FloatParam("feature_weight", *config.feature_weight))
        return params

    def apply(self, model, setting: Mapping[str, Any], config: DistillConfig, ctx: CandidateContext):
        steps = int(setting["steps"])
        ctx.notes["distill_steps"] = steps
        feature_weight = float(setting.get("feature_weight", 0.0))
        features: Sequence[str] = ()
        if feature_weight > 0 and steps > 0:
            features = config.features
            if features == "auto":
                features = stage_outputs(ctx.teacher, ctx.workload.example_input)
                if not features:
                    ctx.skip(self.name, "features", "no blocks found for features = \"auto\"; name the layers")
        return distill(model, ctx.teacher, ctx.workload, temperature=float(setting["temperature"]),
                       alpha=float(setting["alpha"]), steps=steps, lr=config.lr,
                       batch_size=config.batch_size, seed=ctx.seed, features=features,
                       feature_weight=feature_weight, skip=lambda what, why: ctx.skip(self.name, what, why),
                       notes=ctx.notes)


@hookimpl
def register_methods(register):
    register(DistillMethod())
