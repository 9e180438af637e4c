"""Distillation: soft labels pull the student toward the teacher, feature distillation works after
pruning without touching the exported model, and bad settings name their key."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from autocomp.errors import SpaceError
from autocomp_plugins.distill import DistillMethod, distill
from autocomp_plugins.prune import prunable_groups, prune_model

pytestmark = pytest.mark.usefixtures("torch_threads")


def _pruned_student(workload, ratio=0.5):
    student = copy.deepcopy(workload.model)
    x = workload.example_input
    prune_model(student, x, {name: ratio for name in prunable_groups(student, x)}, "l2", round_to=2)
    return student


def _kl_to_teacher(student, teacher, inputs) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student.eval()(inputs), 1), F.log_softmax(teacher.eval()(inputs), 1),
                              reduction="batchmean", log_target=True))


def test_soft_labels_alone_move_the_student_toward_the_teacher(tiny_workload):
    teacher, inputs = tiny_workload.model, tiny_workload.train.inputs[:256]
    student = _pruned_student(tiny_workload)
    before = _kl_to_teacher(student, teacher, inputs)
    distill(student, teacher, tiny_workload, temperature=2.0, alpha=1.0, steps=40, lr=0.01, batch_size=64, seed=0)
    assert _kl_to_teacher(student, teacher, inputs) < 0.5 * before


def test_zero_steps_leave_the_weights_unchanged(tiny_workload):
    student = _pruned_student(tiny_workload)
    before = copy.deepcopy(student.state_dict())
    out = distill(student, tiny_workload.model, tiny_workload, temperature=4.0, alpha=0.5, steps=0, lr=0.01,
                  batch_size=64, seed=0, features=["layer1.1"], feature_weight=1.0)
    assert out is student and not student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def _context(workload, tmp_path, seed=0):
    from autocomp.method import CandidateContext

    return CandidateContext(workload=workload, teacher=workload.model, target=None, work_dir=tmp_path, seed=seed)


def test_feature_distillation_after_pruning_lowers_the_feature_loss_and_leaves_no_trace(tmp_path, tiny_workload):
    from autocomp.export import check_parity, export_onnx

    method = DistillMethod()
    config = method.parse_config({"steps": 60, "features": "auto", "feature_weight": [0.5, 5.0]}, "space.toml")
    teacher_state = copy.deepcopy(tiny_workload.model.state_dict())
    student = _pruned_student(tiny_workload, ratio=0.75)
    keys = set(student.state_dict())
    ctx = _context(tiny_workload, tmp_path)
    setting = {"temperature": 2.0, "alpha": 0.5, "steps": 60, "feature_weight": 5.0}
    student = method.apply(student, setting, config, ctx)
    # "auto": the last block of each stage; every one lost channels, so each needed an adapter
    assert ctx.notes["distill_features"] == ["layer1.1", "layer2.0", "layer3.0"]
    loss = ctx.notes["distill_feature_loss"]
    assert loss["last"] < 0.7 * loss["first"]
    assert ctx.skipped == []
    # the adapters and hooks are gone: the student is exactly the pruned architecture
    assert set(student.state_dict()) == keys
    for model in (student, tiny_workload.model):
        assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(teacher_state[k], v) for k, v in tiny_workload.model.state_dict().items())
    path = export_onnx(student, tiny_workload.example_input, tmp_path / "student.onnx")
    assert check_parity(student, path, tiny_workload.val.inputs[:16]) < 1e-4


def test_a_feature_layer_the_student_lost_is_skipped(tmp_path, tiny_workload):
    student = _pruned_student(tiny_workload)
    del student.layer1[1]  # a layer the student does not have
    ctx = _context(tiny_workload, tmp_path)
    distill(student, tiny_workload.model, tiny_workload, temperature=2.0, alpha=0.0, steps=5, lr=0.01,
            batch_size=64, seed=0, features=["layer1.1", "layer3.0"], feature_weight=1.0,
            skip=lambda what, why: ctx.skip("distill", what, why), notes=ctx.notes)
    assert [what for _, what, _ in ctx.skipped] == ["layer1.1"]
    assert ctx.notes["distill_features"] == ["layer3.0"]


def test_parameters_add_feature_weight_only_when_features_are_on(tmp_path, tiny_workload):
    from autocomp.method import BaseModelInfo, FloatParam

    method = DistillMethod()
    info = BaseModelInfo(tiny_workload.model, tiny_workload.example_input, tmp_path / "m.onnx", None)
    plain = method.parameters(method.parse_config({}, "space.toml"), info)
    assert [p.name for p in plain] == ["temperature", "alpha", "steps"]
    on = method.parameters(method.parse_config({"features": ["layer2.0"], "feature_weight": [0.0, 2.0]}, "s.toml"), info)
    assert on[-1] == FloatParam("feature_weight", 0.0, 2.0)
    with pytest.raises(SpaceError, match="no module 'layer9'") as info_error:
        method.parameters(method.parse_config({"features": ["layer9"], "feature_weight": 1.0}, "s.toml"), info)
    assert info_error.value.key == "distill.features"


@pytest.mark.parametrize("table, key", [
    ({"temperature": [8.0, 1.0]}, "distill.temperature"),
    ({"alpha": 1.5}, "distill.alpha"),
    ({"steps": -1}, "distill.steps"),
    ({"lr": 0}, "distill.lr"),
    ({"batch_size": 0}, "distill.batch_size"),
    ({"features": "all"}, "distill.features"),
    ({"features": ["layer1.0", "layer1.0"]}, "distill.features"),
    ({"features": "auto", "feature_weight": -1.0}, "distill.feature_weight"),
    ({"feature_weight": 0.5}, "distill.feature_weight"),  # no features to distill
])
def test_bad_distill_config_names_the_file_and_key(table, key):
    with pytest.raises(SpaceError) as info:
        DistillMethod().parse_config(table, "file.toml")
    assert info.value.key == key and info.value.source == "file.toml"
    assert str(info.value).startswith(f"file.toml: [{key}] ")


def test_unknown_distill_key_is_named():
    with pytest.raises(SpaceError, match=r"unknown key\(s\) feature_weigth; allowed: .*feature_weight"):
        DistillMethod().parse_config({"feature_weigth": 1.0}, "file.toml")


def test_a_candidate_with_progressive_taylor_pruning_and_feature_distillation(tmp_path, tiny_workload):
    """The whole recipe through the engine: sampled, built, exported, faithful."""
    import optuna

    from autocomp.candidate import build_model
    from autocomp.export import check_parity, export_onnx
    from autocomp.method import BaseModelInfo
    from autocomp.space import parse_space
    from autocomp_plugins.prune import PruneMethod

    tables = {"prune": {"ratio": [0.0, 0.5], "round_to": 2, "importance": ["l2", "taylor"], "scope": ["group", "global"],
                        "progressive_steps": 2, "finetune_steps": 3},
              "distill": {"steps": 10, "features": "auto", "feature_weight": [0.0, 2.0]}}
    space = parse_space(tables, {"prune": PruneMethod(), "distill": DistillMethod()}, source="t.toml")
    base = BaseModelInfo(tiny_workload.model, tiny_workload.example_input, tmp_path / "m.onnx", None)
    concrete = space.concrete(base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"prune.importance": "taylor", "prune.scope": "global", "prune.global_ratio": 0.5,
                         "distill.feature_weight": 1.0})
    spec = concrete.sample(study.ask())
    assert spec.settings["prune"] == {"importance": "taylor", "scope": "global", "global_ratio": 0.5}
    ctx = _context(tiny_workload, tmp_path)
    model = build_model(tiny_workload.model, spec, concrete, ctx)
    assert ctx.skipped == [] and ctx.notes["distill_features"]
    assert all(kept < channels for channels, kept in ctx.notes["prune_channels"].values())
    path = export_onnx(model, tiny_workload.example_input, tmp_path / "candidate.onnx")
    assert check_parity(model, path, tiny_workload.val.inputs[:16]) < 1e-4
