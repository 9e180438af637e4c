"""autocomp.testing: the conformance checks plugin authors run. Every built-in plugin passes them,
and each kind of broken plugin fails exactly the check that names its fault."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from autocomp import FloatParam, LatencyStats, Method
from autocomp.errors import CandidateError
from autocomp.method import EVALUATION_ARTIFACT
from autocomp.testing import ConformanceError, HostTarget, check_method, check_target, check_workload, tiny_workload

#: Fast tables for the built-in methods (distillation's default is 150 steps).
TABLES = {"distill": {"steps": [3, 3]}}
TWO = ("resnet20", "vit")  # a residual CNN and a transformer keep these tests at a few seconds each


def _failed(excinfo) -> set[str]:
    return {f.check for f in excinfo.value.report.failures}


# --- the built-in plugins pass ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prune", "remove_blocks", "lowrank", "distill", "quantize"])
def test_every_builtin_method_passes(name, registry, tmp_path, torch_threads):
    report = check_method(registry.methods[name], TABLES.get(name, {}), work_dir=tmp_path, architectures=TWO,
                          samples=1)
    assert not report.failures
    kinds = {f.where.split(" / ")[1] for f in report.findings if " / " in f.where}
    assert {"mildest", "strongest"} <= kinds
    assert report.passed >= 20
    if registry.methods[name].stage == "structural":  # the strongest setting costs less on both models
        costs = [f.detail for f in report.findings if f.check == "cost against the base model"]
        assert len(costs) == 2 and all(float(c.split("x")[1].split(",")[0]) < 1 for c in costs)


@pytest.mark.parametrize("name", ["cpu", "jetson-orin-nano", "raspberry-pi-4"])
def test_builtin_targets_pass(name, registry, tmp_path):
    report = check_target(registry.target(name), work_dir=tmp_path)
    assert not report.failures and report.passed == 11


def test_the_report_lists_checks_and_figures(registry, tmp_path, torch_threads):
    report = check_method(registry.methods["remove_blocks"], work_dir=tmp_path, architectures=("resnet20",),
                          samples=0)
    text = str(report)
    assert text.startswith(f"method 'remove_blocks': {report.passed} checks passed, 0 failed")
    assert "[ok] resnet20 / strongest: exports to ONNX and agrees with its export" in text
    assert "[figure] resnet20 / mildest: accuracy (base model 1.0): 1.000" in text


def test_tiny_workload_is_deterministic_and_labelled_by_its_model():
    state = torch.random.get_rng_state()
    a, b = tiny_workload("mobilenet_v2", examples=16), tiny_workload("mobilenet_v2", examples=16)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(a.model(a.val.inputs).argmax(1), a.val.targets)


# --- broken methods fail the check that names their fault --------------------------------------


@dataclass(frozen=True)
class KeepConfig:
    keep: tuple[float, float] = (0.5, 1.0)


class HalveFc(Method):
    """A correct structural method: the classifier (``fc`` or ``head``) factorized by SVD into two
    layers, keeping ``keep`` of its rank."""

    name, stage, config_type = "halve_fc", "structural", KeepConfig

    def parameters(self, config, base):
        return [FloatParam("keep", *config.keep, neutral=config.keep[1])]

    def changes_nothing(self, setting, config):
        return setting["keep"] >= 1.0

    def apply(self, model, setting, config, ctx):
        head = getattr(model, "fc", None) or getattr(model, "head", None)
        if setting["keep"] >= 1.0 or not isinstance(head, torch.nn.Linear):
            return model
        rank = max(1, round(setting["keep"] * min(head.weight.shape)))
        u, s, vh = torch.linalg.svd(head.weight.detach(), full_matrices=False)
        first, second = torch.nn.Linear(head.in_features, rank, bias=False), torch.nn.Linear(rank, head.out_features)
        first.weight.data, second.weight.data = (s[:rank, None] * vh[:rank]).contiguous(), u[:, :rank].contiguous()
        second.bias.data = head.bias.detach().clone()
        setattr(model, "fc" if hasattr(model, "fc") else "head", torch.nn.Sequential(first, second))
        return model


def _broken(**overrides):
    """A HalveFc whose methods are replaced by ``overrides``."""
    return type("Broken", (HalveFc,), overrides)()


def _apply_then(effect):
    """HalveFc's apply with ``effect`` where it compresses (at the mildest setting it changes nothing)."""
    def apply(self, model, setting, config, ctx):
        model = HalveFc.apply(self, model, setting, config, ctx)
        return effect(model, setting, ctx) if setting["keep"] < 1.0 else model
    return apply


def test_a_correct_method_passes(tmp_path, torch_threads):
    report = check_method(HalveFc(), work_dir=tmp_path, architectures=TWO)
    assert not report.failures
    assert sum(f.check == "changes_nothing() is true only where apply leaves the model as it was"
               for f in report.findings) == 2  # checked at the mildest setting of both models


def _teacher_nudged(model, setting, ctx):
    with torch.no_grad():
        next(ctx.teacher.parameters()).add_(1.0)
    return model


def _teacher_hooked(model, setting, ctx):
    ctx.teacher.fc.register_forward_hook(lambda module, args, output: None)
    return model


def _teacher_backward_hooked(model, setting, ctx):
    ctx.teacher.fc.register_full_backward_pre_hook(lambda module, grad_output: None)
    return model


def _teacher_weight_hooked(model, setting, ctx):
    ctx.teacher.fc.weight.register_hook(lambda grad: grad)
    return model


def _teacher_trained(model, setting, ctx):
    ctx.teacher.train()
    return model


def _teacher_frozen(model, setting, ctx):
    ctx.teacher.fc.weight.requires_grad_(False)
    return model


def _output_cut(model, setting, ctx):
    model.fc.append(torch.nn.Linear(10, 3))
    return model


def _made_nan(model, setting, ctx):
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("shape mismatch in a custom layer")


class _Pair(torch.nn.Module):
    def forward(self, x):
        return x, x


class _Noisy(torch.nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


def _noise_added(model, setting, ctx):
    model.fc.insert(0, _Noisy())
    return model


def _bad_skip(model, setting, ctx):
    ctx.skip("halve_fc", Path("fc"), 3)
    return model


@pytest.mark.parametrize(("fault", "apply", "expected"), [
    ("returns None (changed in place)", _apply_then(lambda m, s, c: None), {"returns the model"}),
    ("changes the teacher", _apply_then(_teacher_nudged), {"leaves the base model and the teacher as they were"}),
    ("leaves a hook on the teacher", _apply_then(_teacher_hooked),
     {"leaves the base model and the teacher as they were"}),
    ("leaves a backward hook on the teacher", _apply_then(_teacher_backward_hooked),
     {"leaves the base model and the teacher as they were"}),
    ("leaves a hook on a teacher weight", _apply_then(_teacher_weight_hooked),
     {"leaves the base model and the teacher as they were"}),
    ("leaves the teacher training", _apply_then(_teacher_trained),
     {"leaves the base model and the teacher as they were"}),
    ("freezes a teacher weight", _apply_then(_teacher_frozen), {"leaves the base model and the teacher as they were"}),
    ("changes the output's shape", _apply_then(_output_cut), {"keeps the output's shape"}),
    ("gives NaN", _apply_then(_made_nan), {"gives finite outputs"}),
    ("exports unfaithfully", _apply_then(_noise_added), {"exports to ONNX and agrees with its export"}),
    ("skips with non-strings", _apply_then(_bad_skip), {"ctx.skip entries are (method, what, why) strings"}),
    ("builds a model that raises", _apply_then(lambda m, s, c: m.fc.append(_Raises()) or m),
     {"its model runs on the base model's inputs, giving one tensor"}),
    ("builds a model giving a tuple", _apply_then(lambda m, s, c: m.fc.append(_Pair()) or m),
     {"its model runs on the base model's inputs, giving one tensor"}),
])
def test_a_broken_apply_fails_its_check(fault, apply, expected, tmp_path, torch_threads):
    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(apply=apply), work_dir=tmp_path, architectures=("resnet20",), samples=0)
    assert _failed(excinfo) == expected, fault
    assert str(excinfo.value).startswith("method 'halve_fc' broke")


def test_a_hook_left_on_every_module_fails(tmp_path, torch_threads):
    handles = []

    def hook_everything(model, setting, ctx):
        handles.append(torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None))
        return model

    try:
        with pytest.raises(ConformanceError) as excinfo:
            check_method(_broken(apply=_apply_then(hook_everything)), work_dir=tmp_path, architectures=("resnet20",),
                         samples=0)
    finally:
        for handle in handles:
            handle.remove()
    assert handles and _failed(excinfo) == {"leaves the base model and the teacher as they were"}


def test_an_apply_raising_anything_but_candidate_error_fails(tmp_path, torch_threads):
    def apply(self, model, setting, config, ctx):
        raise ValueError("index out of range")

    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(apply=apply), work_dir=tmp_path, architectures=("resnet20",), samples=0)
    assert _failed(excinfo) == {"apply raises only CandidateError", "builds a candidate"}
    assert "ValueError: index out of range" in str(excinfo.value)


def test_refusing_some_candidates_is_allowed_but_not_all(tmp_path, torch_threads):
    def refuse_strong(self, model, setting, config, ctx):
        if setting["keep"] < 1.0:
            raise CandidateError("too small")
        return model

    report = check_method(_broken(apply=refuse_strong), work_dir=tmp_path / "some", architectures=("resnet20",),
                          samples=0)
    assert any(f.check == "refused this candidate (CandidateError)" for f in report.findings)

    def refuse_all(self, model, setting, config, ctx):
        raise CandidateError("never")

    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(apply=refuse_all), work_dir=tmp_path / "all", architectures=("resnet20",), samples=0)
    assert _failed(excinfo) == {"builds a candidate"}


def test_changes_nothing_that_is_wrong_fails(tmp_path, torch_threads):
    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(changes_nothing=lambda self, setting, config: True), work_dir=tmp_path,
                     architectures=("resnet20",), samples=0)
    assert _failed(excinfo) == {"changes_nothing() is true only where apply leaves the model as it was"}
    [failure] = excinfo.value.report.failures
    assert failure.where == "resnet20 / strongest"  # the mildest setting really changes nothing


def test_a_canonical_form_that_builds_another_candidate_fails(tmp_path, torch_threads):
    """Writing every setting as "no change" claims the strongest candidate is the base model."""
    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(canonical=lambda self, setting, config: {"keep": 1.0}), work_dir=tmp_path,
                     architectures=("resnet20",), samples=0)
    # and, the canonical form being the mildest setting, that it changes nothing
    assert _failed(excinfo) == {"its canonical form builds the same candidate",
                                "changes_nothing() is true only where apply leaves the model as it was"}


def test_a_canonical_form_naming_other_parameters_fails(tmp_path, torch_threads):
    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(canonical=lambda self, setting, config: {**setting, "halve_fc.keep": 1}),
                     work_dir=tmp_path, architectures=("resnet20",), samples=0)
    assert _failed(excinfo) == {"canonical() names only the method's parameters"}
    assert "['halve_fc.keep'] are not parameters it declared" in str(excinfo.value)


def test_a_canonical_form_leaving_a_parameter_out_need_not_be_applicable(tmp_path, torch_threads):
    """The engine compares canonical forms and never applies them: dropping a parameter that does
    not matter (how to factorize, when nothing is factorized) is allowed."""
    from autocomp import ChoiceParam

    class WithHow(HalveFc):
        def parameters(self, config, base):
            return [*HalveFc.parameters(self, config, base), ChoiceParam("how", ("svd", "svd-again"))]

        def canonical(self, setting, config):
            return {"keep": 1.0} if setting["keep"] >= 1.0 else setting

        def apply(self, model, setting, config, ctx):
            assert setting["how"] in ("svd", "svd-again")
            return HalveFc.apply(self, model, setting, config, ctx)

    assert not check_method(WithHow(), work_dir=tmp_path, architectures=("resnet20",), samples=0).failures


def test_each_apply_runs_seeded_and_leaves_the_global_random_state_alone(tmp_path, torch_threads):
    draws = []

    def noisy(self, model, setting, config, ctx):
        draws.append(torch.rand(1).item())
        return model

    state = torch.random.get_rng_state()
    check_method(_broken(apply=noisy), work_dir=tmp_path, architectures=("resnet20",), samples=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(draws) == 2 and draws[0] == draws[1]  # the same seed for each setting


def test_a_canonical_form_that_is_not_its_own_fails(tmp_path, torch_threads):
    def halving(self, setting, config):
        return {"keep": setting["keep"] / 2}

    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(canonical=halving), work_dir=tmp_path, architectures=("resnet20",), samples=0)
    assert "canonical() is its own canonical form" in _failed(excinfo)


def test_parameters_the_engine_cannot_use_fail(tmp_path):
    from autocomp import ChoiceParam

    def stray(self, config, base):
        return [FloatParam("keep", *config.keep, neutral=config.keep[1], module="fcc")]

    def stray_removal(self, config, base):
        return [*HalveFc.parameters(self, config, base), ChoiceParam("drop", (False, True), removes="layer9")]

    def tuples(self, config, base):
        return [*HalveFc.parameters(self, config, base), ChoiceParam("shape", ((1, 2), (2, 1)))]

    calls = []

    def unstable(self, config, base):
        calls.append(1)
        return [FloatParam("keep", *config.keep, neutral=config.keep[1], step=0.5 if len(calls) > 1 else None)]

    cases = {"stray": (stray, "its parameters' module and removes name parts of the model", "keep (module='fcc')"),
             "stray removal": (stray_removal, "its parameters' module and removes name parts of the model",
                               "drop (removes='layer9')"),
             "tuples": (tuples, "its choices are None, bool, int, float or str", "shape: the study's storage"),
             "unstable": (unstable, "declares the same parameters when asked again (a resumed search asks again)",
                          "the second call to parameters() gave other parameters")}
    for case, (parameters, expected, detail) in cases.items():
        with pytest.raises(ConformanceError) as excinfo:
            check_method(_broken(parameters=parameters), work_dir=tmp_path / case, architectures=("resnet20",),
                         samples=0)
        assert _failed(excinfo) == {expected}, case
        assert detail in str(excinfo.value), case


def test_a_parameter_may_name_a_weight_or_a_shared_module(tmp_path, torch_threads):
    def on_weight(self, config, base):
        return [FloatParam("keep", *config.keep, neutral=config.keep[1], module="fc.weight")]

    assert not check_method(_broken(parameters=on_weight), work_dir=tmp_path, architectures=("resnet20",),
                            samples=0).failures


def test_a_bad_registration_table_or_parameter_fails_first(tmp_path):
    with pytest.raises(ConformanceError) as excinfo:
        check_method(HalveFc, work_dir=tmp_path)
    assert _failed(excinfo) == {"is a method autocomp registers"}
    assert "register HalveFc()" in str(excinfo.value)

    with pytest.raises(ConformanceError) as excinfo:
        check_method(HalveFc(), {"kep": [0.5, 1.0]}, work_dir=tmp_path)
    assert _failed(excinfo) == {"parses its table"}
    assert "unknown key(s) kep" in str(excinfo.value)

    def bad(self, config, base):
        return [FloatParam("keep", 1.0, 0.5)]

    with pytest.raises(ConformanceError) as excinfo:
        check_method(_broken(parameters=bad), work_dir=tmp_path, architectures=("resnet20",))
    assert _failed(excinfo) == {"declares well-formed parameters", "builds a candidate"}
    assert "low=1.0 > high=0.5" in str(excinfo.value)


class CopyTeacher(Method):
    """A recovery method that assumes the student has the teacher's structure: wrong after pruning."""

    name, stage, config_type = "copy_teacher", "recovery", KeepConfig

    def parameters(self, config, base):
        return []

    def apply(self, model, setting, config, ctx):
        model.load_state_dict(ctx.teacher.state_dict())
        return model


@dataclass(frozen=True)
class ScaleConfig:
    scale: tuple[float, float] = (0.0, 0.5)


class Shrink(Method):
    """A correct recovery method: scales the student's weights down by ``scale`` (0: unchanged)."""

    name, stage, config_type = "shrink", "recovery", ScaleConfig

    def parameters(self, config, base):
        return [FloatParam("scale", *config.scale, neutral=config.scale[0])]

    def changes_nothing(self, setting, config):
        return setting["scale"] == 0.0

    def apply(self, model, setting, config, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 - setting["scale"])
        return model


def test_a_correct_recovery_method_passes_on_both_students(tmp_path, torch_threads):
    report = check_method(Shrink(), work_dir=tmp_path, architectures=("resnet20",), samples=0)
    assert not report.failures
    nothing = [f.where for f in report.findings
               if f.check == "changes_nothing() is true only where apply leaves the model as it was"]
    assert nothing == ["resnet20 / mildest", "resnet20 / mildest, full width"]  # against each its own student


def test_a_recovery_method_refusing_another_structure_still_builds_at_full_width(tmp_path, torch_threads):
    def same_structure_only(self, model, setting, config, ctx):
        if [p.shape for p in model.parameters()] != [p.shape for p in ctx.teacher.parameters()]:
            raise CandidateError("needs the teacher's structure")
        return model

    report = check_method(type("Picky", (Shrink,), {"apply": same_structure_only})(), work_dir=tmp_path,
                          architectures=("resnet20",), samples=0)
    assert not report.failures
    assert [f.where for f in report.findings if f.check.startswith("refused")] == [
        "resnet20 / mildest", "resnet20 / strongest"]


def test_a_recovery_method_gets_a_structurally_changed_student(tmp_path, torch_threads):
    from autocomp.testing import narrow_student

    with pytest.raises(ConformanceError) as excinfo:
        check_method(CopyTeacher(), work_dir=tmp_path, architectures=("resnet20",))
    assert _failed(excinfo) == {"apply raises only CandidateError"}  # it works at full width only
    assert [f.where for f in excinfo.value.report.failures] == ["resnet20 / mildest"]
    assert "size mismatch" in str(excinfo.value)
    student, teacher = narrow_student("resnet20"), tiny_workload("resnet20").model
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    with torch.no_grad():
        assert student(torch.zeros(2, 3, 16, 16)).shape == teacher(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


# --- post-export methods -----------------------------------------------------------------------


@dataclass(frozen=True)
class NoConfig:
    pass


class CopyOnnx(Method):
    """A correct post-export method: writes a copy of the model under ctx.work_dir."""

    name, stage, config_type = "copy_onnx", "post_export", NoConfig

    def parameters(self, config, base):
        return []

    def apply(self, onnx_path, setting, config, ctx):
        out = ctx.work_dir / "copy.onnx"
        out.write_bytes(Path(onnx_path).read_bytes())
        return out


def _post(apply):
    return type("BrokenPost", (CopyOnnx,), {"apply": apply})()


def test_a_correct_post_export_method_passes(tmp_path):
    assert not check_method(CopyOnnx(), work_dir=tmp_path, architectures=("resnet20",)).failures

    def twin(self, onnx_path, setting, config, ctx):  # an artifact this host cannot run, and its twin
        (ctx.work_dir / "twin.onnx").write_bytes(Path(onnx_path).read_bytes())
        ctx.notes[EVALUATION_ARTIFACT] = str(ctx.work_dir / "twin.onnx")
        (ctx.work_dir / "for-the-device.onnx").write_bytes(b"runs on the device only")
        return ctx.work_dir / "for-the-device.onnx"

    report = check_method(_post(twin), work_dir=tmp_path / "twin", architectures=("resnet20",))
    assert not report.failures
    assert [f.check for f in report.findings if "runs in ONNX Runtime" in f.check] == [
        "its evaluation twin (ctx.notes) runs in ONNX Runtime"]


def test_post_export_methods_that_break_their_contract_fail(tmp_path):
    def overwrites(self, onnx_path, setting, config, ctx):
        out = CopyOnnx.apply(self, onnx_path, setting, config, ctx)
        Path(onnx_path).write_bytes(Path(onnx_path).read_bytes() + b"\0")
        return out

    def writes_elsewhere(self, onnx_path, setting, config, ctx):
        out = tmp_path / "elsewhere.onnx"
        out.write_bytes(Path(onnx_path).read_bytes())
        return out

    def writes_garbage(self, onnx_path, setting, config, ctx):
        out = ctx.work_dir / "garbage.onnx"
        out.write_bytes(b"not a model")
        return out

    def returns_nothing(self, onnx_path, setting, config, ctx):
        (ctx.work_dir / "copy.onnx").write_bytes(Path(onnx_path).read_bytes())

    def same_name(self, onnx_path, setting, config, ctx):  # in a trial the export is in ctx.work_dir
        copied = CopyOnnx.apply(self, onnx_path, setting, config, ctx)
        (ctx.work_dir / Path(onnx_path).name).write_bytes(b"scratch")
        return copied

    def missing_twin(self, onnx_path, setting, config, ctx):
        ctx.notes[EVALUATION_ARTIFACT] = str(ctx.work_dir / "twin.onnx")
        return CopyOnnx.apply(self, onnx_path, setting, config, ctx)

    cases = {"overwrites": (overwrites, {"leaves the input ONNX file as it was"}),
             "elsewhere": (writes_elsewhere, {"writes its file under ctx.work_dir"}),
             "garbage": (writes_garbage, {"its file runs in ONNX Runtime", "builds a candidate"}),
             "nothing": (returns_nothing, {"returns the path of the ONNX file it wrote", "builds a candidate"}),
             "same name": (same_name, {"leaves the input ONNX file as it was"}),
             "missing twin": (missing_twin, {"its evaluation twin (ctx.notes) runs in ONNX Runtime",
                                             "builds a candidate"})}
    for case, (apply, expected) in cases.items():
        with pytest.raises(ConformanceError) as excinfo:
            check_method(_post(apply), work_dir=tmp_path / case, architectures=("resnet20",))
        assert _failed(excinfo) == expected, case


# --- targets ------------------------------------------------------------------------------------


def _target(**overrides):
    return type("BrokenTarget", (HostTarget,), {"name": "broken", **overrides})()


def test_targets_that_break_their_contract_fail(tmp_path):
    def stats(p50, p90, measured=True):
        return lambda self, path, shapes: LatencyStats(p50, p90, p50, 1, measured, "broken", min_ms=p50)

    def crashes_on_garbage(self, path, shapes):
        if Path(path).read_bytes().startswith(b"this is not"):
            raise RuntimeError("ORT died")
        return HostTarget.latency(self, path, shapes)

    cases = {
        "dict": ({"latency": lambda self, path, shapes: {"p50": 1.0}}, {"gives latency statistics of a tiny model",
                                                                        "raises CandidateError for a file that is not a model"}),
        "order": ({"latency": stats(2.0, 1.0)}, {"p50 > 0 and p90 >= p50",
                                                 "raises CandidateError for a file that is not a model"}),
        "measured": ({"measured": False, "latency": stats(1.0, 1.0)}, {
            "says measured or predicted as the target does", "raises CandidateError for a file that is not a model"}),
        "garbage": ({"latency": crashes_on_garbage}, {"raises CandidateError for a file that is not a model"}),
        "facts": ({"facts": lambda self: ["not", "a", "dict"]}, {"facts() is a dict"}),
        "no fastest run": ({"latency": lambda self, path, shapes: dataclasses.replace(
            HostTarget.latency(self, path, shapes), min_ms=None)}, {"gives every statistic a search optimises"}),
        "stats not JSON": ({"latency": lambda self, path, shapes: dataclasses.replace(
            HostTarget.latency(self, path, shapes), facts={"model": Path(path)})},
            {"its statistics are JSON (the latency cache stores them)"}),
        "predict": ({"predict_latency": lambda self, path, shapes: -1.0}, {"returns None or a positive number of ms"}),
        "precisions": ({"precisions": frozenset({"int3"})}, {"declares its precisions"}),
    }
    for case, (overrides, expected) in cases.items():
        with pytest.raises(ConformanceError) as excinfo:
            check_target(_target(**overrides), work_dir=tmp_path / case)
        assert _failed(excinfo) == expected, case


def test_a_target_needing_options_is_checked_with_them(tmp_path):
    from autocomp.errors import TargetError

    class NeedsUrl(HostTarget):
        name = "needs-url"

        def configure(self, options):
            if "url" not in options:
                raise TargetError("target 'needs-url' needs --url")
            configured = copy.copy(self)
            configured.url = options["url"]
            return configured

    with pytest.raises(ConformanceError) as excinfo:
        check_target(NeedsUrl(), work_dir=tmp_path)
    assert _failed(excinfo) == {"configure({}) returns a target"}
    assert "needs --url" in str(excinfo.value)
    assert not check_target(NeedsUrl(), {"url": "x"}, work_dir=tmp_path).failures


def test_cli_check_runs_named_plugins_and_exits_1_on_a_broken_one(registry, tmp_path, capsys, monkeypatch):
    from autocomp import cli
    from autocomp.plugins import load_registry, reset_registry

    assert cli.main(["plugins", "--check", "jetson", "remote", "digits-tiny", "--json"]) == 0  # jetson: an alias
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checked"]}
    assert rows["digits-tiny"]["status"] == "ok" and rows["digits-tiny"]["kind"] == "workload"
    assert rows["jetson-orin-nano"]["status"] == "ok" and rows["jetson-orin-nano"]["passed"] == 11
    assert rows["remote"]["status"] == "not checked: it needs options" and rows["remote"]["passed"] is None
    assert "needs the agent's URL" in rows["remote"]["details"][0]

    class Plugin:
        @staticmethod
        def register_methods(register):
            register(_broken(changes_nothing=lambda self, setting, config: True))

        @staticmethod
        def register_targets(register):  # forgot `return self`: broken, not "needs options"
            register(_target(name="forgetful", configure=lambda self, options: None))

    from autocomp import hookimpl

    Plugin.register_methods = hookimpl(Plugin.register_methods)
    Plugin.register_targets = hookimpl(Plugin.register_targets)
    reset_registry(load_registry(entry_points=[], extra_plugins=[("halve", Plugin)]))
    space = tmp_path / "space.toml"
    space.write_text("[halve_fc]\nkeep = [0.25, 1.0]\n")
    check = ["plugins", "--check", "halve_fc", "--space", str(space), "--arch", "resnet20"]
    assert cli.main([*check, "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["checked"]
    assert row["status"] == "FAILED" and row["details"][0] == (
        "[FAILED] resnet20 / strongest: changes_nothing() is true only where apply leaves the model as it was: "
        "changes_nothing() says this setting changes nothing, but the candidate differs from the base model; the "
        "search would then skip fine-tuning it and count it as the base model")
    assert [line.split(":")[0] for line in row["details"]] == [  # every setting but the mildest
        "[FAILED] resnet20 / strongest", "[FAILED] resnet20 / random 1", "[FAILED] resnet20 / random 2"]
    assert cli.main(["plugins", "--check", "forgetful", "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["checked"]
    assert row["status"] == "FAILED" and "configure({}) returns a target: it returned None" in row["details"][0]
    monkeypatch.setenv("COLUMNS", "400")
    assert cli.main(check) == 1
    assert "method halve_fc: [FAILED] resnet20 / strongest: changes_nothing()" in capsys.readouterr().err
    assert cli.main(["plugins", "--check", "nope"]) == 2
    assert "no method, target or workload named 'nope'" in capsys.readouterr().err
    assert cli.main([*check, "--arch", "resnet1000"]) == 2
    assert "unknown architecture(s) resnet1000" in capsys.readouterr().err
    assert cli.main(["plugins", "--arch", "resnet20"]) == 2
    assert "add --check" in capsys.readouterr().err


# --- workloads ----------------------------------------------------------------------------------


def test_the_builtin_tiny_digits_workload_passes(tiny_workload, tmp_path):
    from autocomp_plugins.digits import tiny_digits_workload

    report = check_workload(tiny_digits_workload, work_dir=tmp_path)
    assert not report.failures and report.passed == 7
    assert report.subject == "workload 'digits-tiny'"


def test_workloads_that_break_their_contract_fail(tmp_path, torch_threads):
    from autocomp import Workload

    def make(seed=0, **overrides):
        base = tiny_workload("resnet20", seed=seed)
        return Workload(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(Workload)}, **overrides})

    class Pair(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x), x

    class Noisy(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x + torch.randn_like(x))

    seeds = iter(range(100))
    cases = {
        "random each call": (lambda: make(seed=next(seeds)), {"gives the same model and validation data on every call"}),
        "returns None": (lambda: None, {"returns a Workload"}),
        "tuple output": (lambda: make(model=Pair(tiny_workload("resnet20").model)),
                         {"runs on its validation inputs, giving one output per example"}),
        "unfaithful export": (lambda: make(model=Noisy(tiny_workload("resnet20").model)),
                              {"exports to ONNX and agrees with its export"}),
        "metric gives NaN": (lambda: make(metric=lambda outputs, targets: float("nan")),
                             {"gives a number on the export's outputs"}),
        "loss is a float": (lambda: make(loss=lambda outputs, targets: 1.0),
                            {"is a scalar the recovery methods can train on"}),
    }
    for case, (factory, expected) in cases.items():
        with pytest.raises(ConformanceError) as excinfo:
            check_workload(factory, work_dir=tmp_path / case.replace(" ", "-"))
        assert _failed(excinfo) == expected, case
    # a Workload given directly is not called twice; a metric giving a numpy integer, a loss of one
    # element, and a model trained again equal within float noise are all fine
    import numpy as np

    workload = make(metric=lambda outputs, targets: np.int64(1),
                    loss=lambda outputs, targets: torch.nn.functional.cross_entropy(outputs, targets).reshape(1))
    assert not check_workload(workload, work_dir=tmp_path / "direct").failures

    def retrained():
        workload = make()
        with torch.no_grad():
            next(workload.model.parameters()).add_(next(seeds) * 1e-9)
        return workload

    report = check_workload(retrained, work_dir=tmp_path / "retrained")
    assert not report.failures
