"""Method ``distill``: recovery by fine-tuning with knowledge distillation from the base model.

Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * task loss.
``alpha = 0`` is plain fine-tuning. Teacher outputs on the training split are computed once per
process (the teacher never changes), so distillation costs no more than fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from autocomp.errors import CandidateError
from autocomp.hookspecs import hookimpl
from autocomp.method import BaseModelInfo, CandidateContext, FloatParam, IntParam, Method, Param, parse_range

__all__ = ["DistillConfig", "DistillMethod", "distill"]


@dataclass(frozen=True)
class DistillConfig:
    """``[distill]`` table. Ranges are sampled, single numbers are fixed."""

    temperature: tuple[float, float] = (1.0, 8.0)
    alpha: tuple[float, float] = (0.0, 0.9)
    steps: tuple[int, int] = (150, 150)
    lr: float = 0.01
    batch_size: int = 64

    def __post_init__(self) -> None:
        for key, kind, low, high in (("temperature", float, 0.1, 100.0), ("alpha", float, 0.0, 1.0),
                                     ("steps", int, 0, 1_000_000)):
            value = getattr(self, key)
            object.__setattr__(self, key, parse_range(list(value) if isinstance(value, tuple) else value,
                                                      key=key, source="", section="distill", kind=kind,
                                                      low=low, high=high))
        if not (0 < self.lr < 10):
            raise ValueError(f"lr must lie in (0, 10), got {self.lr!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


_teacher_cache: dict[tuple[int, int], Any] = {}


def _teacher_outputs(teacher, inputs, batch_size: int = 256):
    import torch

    key = (id(teacher), id(inputs))
    if key not in _teacher_cache:
        with torch.no_grad():
            teacher.eval()
            _teacher_cache.clear()
            _teacher_cache[key] = torch.cat([teacher(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return _teacher_cache[key]


def distill(student, teacher, workload, *, temperature: float, alpha: float, steps: int, lr: float,
            batch_size: int, seed: int):
    """Fine-tune ``student`` in place for ``steps`` minibatches; returns it in eval mode."""
    import torch
    import torch.nn.functional as F

    if steps <= 0:
        return student.eval()
    train = workload.train
    soft_targets = _teacher_outputs(teacher, train.inputs) if alpha > 0 else None
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    student.train()
    perm = torch.randperm(len(train), generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(train):
            perm, pos = torch.randperm(len(train), generator=generator), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        out = student(train.inputs[idx])
        loss = workload.compute_loss(out, train.targets[idx]) * (1 - alpha)
        if soft_targets is not None:
            t = temperature
            kd = F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(soft_targets[idx] / t, dim=1),
                          reduction="batchmean", log_target=True)
            loss = loss + alpha * t * t * kd
        if not torch.isfinite(loss):
            raise CandidateError(f"fine-tuning diverged (loss {float(loss)}); lower [distill] lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()


class DistillMethod(Method):
    name = "distill"
    stage = "recovery"
    config_type = DistillConfig
    description = "fine-tuning with soft-label distillation from the base model (temperature, alpha, steps)"

    def parameters(self, config: DistillConfig, base: BaseModelInfo) -> Sequence[Param]:
        t, a, s = config.temperature, config.alpha, config.steps
        return [FloatParam("temperature", *t), FloatParam("alpha", *a), IntParam("steps", *s)]

    def apply(self, model, setting: Mapping[str, Any], config: DistillConfig, ctx: CandidateContext):
        steps = int(setting["steps"])
        ctx.notes["distill_steps"] = steps
        return distill(model, ctx.teacher, ctx.workload, temperature=float(setting["temperature"]),
                       alpha=float(setting["alpha"]), steps=steps, lr=config.lr,
                       batch_size=config.batch_size, seed=ctx.seed)


@hookimpl
def register_methods(register):
    register(DistillMethod())
