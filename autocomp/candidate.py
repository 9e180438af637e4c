"""Build one candidate from a sampled spec: a pure function of the base model and the spec.

Structural methods run on a deep copy (the base model is never touched), batch-norm statistics
are re-estimated after any structural change, then recovery methods train the copy back. Export and
post-export methods turn it into the final artifact. A candidate whose structural methods left the
model as it was (no pruning, no block removed, full rank) skips both: there is nothing to recover,
and fine-tuning the base model would only add a draw of training noise (and its cost) to what
the post-export methods do alone.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocomp.errors import CandidateError
from autocomp.method import CandidateContext, Method
from autocomp.space import GATE, CandidateSpec, ConcreteSpace

if TYPE_CHECKING:
    import torch

__all__ = ["build_structure", "recover", "build_model", "build_artifact", "recalibrate_batchnorm", "count_macs"]

logger = logging.getLogger("autocomp")


def recalibrate_batchnorm(model: "torch.nn.Module", inputs: "torch.Tensor", batches: int = 8,
                          batch_size: int = 64) -> bool:
    """Re-estimate batch-norm running statistics from ``inputs``; False if the model has none."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i in range(min(batches, max(1, len(inputs) // batch_size))):
            model(inputs[i * batch_size : (i + 1) * batch_size])
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
    return True


def build_model(base_model: "torch.nn.Module", spec: CandidateSpec, space: ConcreteSpace,
                ctx: CandidateContext) -> "torch.nn.Module":
    """The compressed torch model for ``spec``: structural methods, then recovery. ``base_model``
    is not modified."""
    return recover(build_structure(base_model, spec, space, ctx), spec, space, ctx)


def _setting(spec: CandidateSpec, method: Method, space: ConcreteSpace) -> dict[str, Any] | None:
    """The setting ``method`` is applied with, without its on/off parameter; None when the trial
    leaves an optional method out."""
    setting = dict(spec.settings.get(method.name, {}))
    if method.name in space.gated and setting.pop(GATE, True) is False:
        return None
    return setting


def build_structure(base_model: "torch.nn.Module", spec: CandidateSpec, space: ConcreteSpace,
                    ctx: CandidateContext) -> "torch.nn.Module":
    """A deep copy of ``base_model`` with the structural methods of ``spec`` applied (untrained);
    ``structure_unchanged`` noted when they leave it as it was (:meth:`ConcreteSpace.structure_unchanged`)."""
    model = copy.deepcopy(base_model).eval()
    for method, config, params in space.entries:
        setting = _setting(spec, method, space)
        if method.stage == "structural" and setting is not None:
            model = _model_from(method, method.apply(model, setting, config, ctx))
    if space.structure_unchanged(spec.flat()):  # every structural method off or changing nothing
        ctx.notes["structure_unchanged"] = True
    else:
        ctx.notes["bn_recalibrated"] = recalibrate_batchnorm(model, ctx.workload.train.inputs)
    return model.eval()


def recover(model: "torch.nn.Module", spec: CandidateSpec, space: ConcreteSpace,
            ctx: CandidateContext) -> "torch.nn.Module":
    """Run the recovery methods of ``spec`` (fine-tuning, distillation) on ``model``; none when the
    structural methods left the base model as it was (:meth:`ConcreteSpace.structure_unchanged`,
    noted as ``recovery_skipped``)."""
    recovery = [(method, config, setting) for method, config, _ in space.entries
                if method.stage == "recovery" and (setting := _setting(spec, method, space)) is not None]
    if recovery and space.structure_unchanged(spec.flat()):
        ctx.notes["recovery_skipped"] = "the structural methods left the model unchanged: nothing to recover"
        return model.eval()
    for method, config, setting in recovery:
        model = _model_from(method, method.apply(model, setting, config, ctx))
    return model.eval()


def build_artifact(fp32_onnx: Path, spec: CandidateSpec, space: ConcreteSpace, ctx: CandidateContext) -> Path:
    """Run the post-export methods on the exported fp32 model; returns the final ONNX file."""
    from autocomp.method import EVALUATION_ARTIFACT

    path = fp32_onnx
    for method, config, params in space.entries:
        setting = _setting(spec, method, space)
        if method.stage == "post_export" and setting is not None:
            ctx.notes.pop(EVALUATION_ARTIFACT, None)  # the twin belongs to the last method that ran
            path = _onnx_from(method, method.apply(path, setting, config, ctx))
    return path


def _model_from(method: Method, result: Any) -> "torch.nn.Module":
    """What a structural or recovery method's ``apply`` returned, checked: the model (a method that
    changes it in place still returns it)."""
    import torch

    if not isinstance(result, torch.nn.Module):
        raise CandidateError(f"method {method.name!r}: apply() returned {type(result).__name__}, not the model; a "
                             "method that changes the model in place still returns it (a bug in its plugin)")
    return result


def _onnx_from(method: Method, result: Any) -> Path:
    """What a post-export method's ``apply`` returned, checked: the path of an ONNX file that exists."""
    if not isinstance(result, (str, os.PathLike)) or not Path(result).is_file():
        raise CandidateError(f"method {method.name!r}: apply() returned {result!r}, not the path of the ONNX file "
                             "it wrote (a bug in its plugin)")
    return Path(result)


def count_macs(model: "torch.nn.Module", example_input: "torch.Tensor") -> tuple[int, int]:
    """(MACs, parameters) of ``model`` for ``example_input``, counted by torch-pruning."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)
