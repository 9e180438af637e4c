"""Search-space files: validation errors name the file, the key and what is allowed."""

from __future__ import annotations

import math

import pytest

from autocomp.errors import SpaceError
from autocomp.method import ChoiceParam, FloatParam

from .conftest import unmeasured_target
from autocomp.space import default_space_path, load_space


def _write(tmp_path, text):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tiny_workload, tmp_path_factory):
    """The built-in tiny digits model's fp32 export, shared by the tests of this module."""
    from autocomp.export import export_onnx

    return export_onnx(tiny_workload.model, tiny_workload.example_input, tmp_path_factory.mktemp("digits") / "m.onnx")


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, torch_threads):
    """``arch -> (model, example input, fp32 export)`` at tiny size, each built and exported once."""
    built = {}

    def get(arch):
        if arch not in built:
            import torch

            from autocomp import zoo
            from autocomp.export import export_onnx

            torch.manual_seed(0)
            model = zoo.build(arch, **zoo.tiny_kwargs(arch)).eval()
            x = zoo.example_input(arch, tiny=True)
            built[arch] = (model, x, export_onnx(model, x, tmp_path_factory.mktemp(arch) / "m.onnx"))
        return built[arch]

    return get


def _joint_space(registry, tiny_zoo):
    """The shipped joint space made concrete for the tiny ResNet-20, on the jetson target."""
    from autocomp.method import BaseModelInfo

    model, x, onnx_path = tiny_zoo("resnet20")
    space = load_space(default_space_path().with_name("joint.toml"), registry.methods)
    return space.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))


def test_default_space_loads(registry):
    space = load_space(default_space_path(), registry.methods)
    assert space.names() == ["prune", "distill", "quantize"]  # stage order, as in the file's stages


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[prnue]\nratio = [0.1, 0.5]\n", r"unknown method\(s\) prnue; installed methods: distill, lowrank, prune, quantize, remove_blocks"),
        ("[prune]\nratoi = [0.1, 0.5]\n", r"\[prune\] unknown key\(s\) ratoi; allowed: .*\bratio\b"),
        ("[prune]\nratio = [0.1, 1.5]\n", r"\[prune.ratio\] values must lie in \[0.0, 0.95\], got \[0.1, 1.5\]"),
        ("[prune]\nratio = [0.6, 0.2]\n", r"`low <= high` must hold, but got \(low=0.6, high=0.2\)"),
        ("[prune]\nimportance = 'l3'\n", r"\[prune.importance\] importance must be one of l1, l2, .*got 'l3'"),
        ("[quantize]\nbits = [7]\n", r"\[quantize.bits\] .*drawn from \[4, 8, 16, 32\].*got \[7\]"),
        ("[distill]\nsteps = [10.5, 20]\n", r"expected whole numbers"),
        ("[prune\nratio = 1\n", r"not valid TOML"),
        ("", r"enables no method"),
    ],
)
def test_bad_space_files_name_file_key_and_rule(tmp_path, registry, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError, match=expected) as info:
        load_space(path, registry.methods)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path, registry):
    with pytest.raises(SpaceError, match="file not found"):
        load_space(tmp_path / "nope.toml", registry.methods)


def test_concrete_parameters_follow_the_model(registry, tiny_workload, tiny_onnx):
    from autocomp.method import BaseModelInfo, ChoiceParam

    space = load_space(default_space_path(), registry.methods)
    concrete = space.concrete(BaseModelInfo(tiny_workload.model, tiny_workload.example_input, tiny_onnx,
                                            registry.target("cpu")))
    by_method = {m.name: params for m, _, params in concrete.entries}
    # digits has 7 prunable groups (the classifier is never a root) and 12 quantizable layers: 11 convs (stem, 4 in layer1, 3 each in layer2 and layer3 with their shortcuts) and fc
    assert len(by_method["prune"]) == 7 and all(isinstance(p, FloatParam) for p in by_method["prune"])
    assert {p.name for p in by_method["quantize"]} >= {"stem.0", "layer1.0.conv1", "fc"}
    assert all(isinstance(p, ChoiceParam) and p.choices == ("fp32", "int8") for p in by_method["quantize"])
    assert len(by_method["quantize"]) == 12


def test_quantize_parameters_intersect_target_precisions(registry, tiny_workload, tiny_onnx):
    from autocomp.method import BaseModelInfo

    space = load_space(default_space_path(), registry.methods)
    target = unmeasured_target("fp32-only")
    concrete = space.concrete(BaseModelInfo(tiny_workload.model, tiny_workload.example_input, tiny_onnx, target))
    assert {m.name: len(p) for m, _, p in concrete.entries}["quantize"] == 0


def test_parameters_of_a_removed_module_are_not_sampled(registry):
    """A parameter that removes a module hides later parameters concerning it or its children."""
    import optuna

    from autocomp.method import ChoiceParam, Method
    from autocomp.space import ConcreteSpace

    class _Declared(Method):
        def parameters(self, config, base):
            raise AssertionError("parameters are given directly in this test")

        def apply(self, subject, setting, config, ctx):
            raise AssertionError("nothing is applied in this test")

    class Remove(_Declared):
        name, stage = "remove_blocks", "structural"

    class Prune(_Declared):
        name, stage = "prune", "structural"

    space = ConcreteSpace((
        (Remove(), None, (ChoiceParam("layer1.1", (False, True), removes="layer1.1"),)),
        (Prune(), None, (FloatParam("layer1.1.conv1", 0.0, 0.5, module="layer1.1.conv1"),
                         FloatParam("layer1.10.conv1", 0.0, 0.5, module="layer1.10.conv1"))),
    ))
    study = optuna.create_study()
    study.enqueue_trial({"remove_blocks.layer1.1": True})
    study.enqueue_trial({"remove_blocks.layer1.1": False})
    removed = space.sample(study.ask())
    kept = space.sample(study.ask())
    assert removed.settings["prune"].keys() == {"layer1.10.conv1"}  # a prefix match is not a parent
    assert kept.settings["prune"].keys() == {"layer1.1.conv1", "layer1.10.conv1"}


@pytest.mark.parametrize("space_name", ["default", "joint", "cnn", "transformer"])
@pytest.mark.parametrize("arch", ["resnet20", "vit"])
def test_shipped_spaces_load_and_give_parameters(registry, space_name, arch, tiny_zoo):
    """Every shipped space validates and yields parameters for a CNN and a transformer of the zoo."""
    from autocomp.method import BaseModelInfo

    model, x, onnx_path = tiny_zoo(arch)
    space = load_space(default_space_path().with_name(f"{space_name}.toml"), registry.methods)
    concrete = space.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    counts = {m.name: len(p) for m, _, p in concrete.entries}
    assert counts["prune"] > 0 and counts["quantize"] > 0
    if "remove_blocks" in counts:
        assert counts["remove_blocks"] > 0


def test_anchor_trials_compress_uniformly_and_leave_blunt_methods_alone(tmp_path, registry, tiny_zoo):
    """The enqueued anchors of the joint space: pruning moves away from its neutral end as the
    quantile grows, every precision is the strongest offered, and block removal and low-rank
    factorization (not in anchors) stay at their neutral values."""
    from autocomp.method import BaseModelInfo
    from autocomp.proposals import _anchor_params, _compresses, anchors

    model, x, onnx_path = tiny_zoo("resnet20")
    space = load_space(default_space_path().with_name("joint.toml"), registry.methods)
    concrete = space.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    params = {m.name: p for m, _, p in concrete.entries}
    mild, strong = _anchor_params(concrete, 0.5), _anchor_params(concrete, 0.85)
    for anchor in (mild, strong):
        # optional and not in anchors: switched off, and every parameter at its neutral value
        assert anchor["remove_blocks.enabled"] is False and anchor["lowrank.enabled"] is False
        assert all(anchor[f"remove_blocks.{p.name}"] is False for p in params["remove_blocks"])
        assert all(anchor[f"lowrank.{p.name}"] == (False if p.name == "enabled" else 1.0) for p in params["lowrank"])
        # optional and in anchors: switched on, every layer at the strongest precision
        assert anchor["quantize.enabled"] is True
        assert {anchor[f"quantize.{p.name}"] for p in params["quantize"] if p.name != "enabled"} == {"int8"}
        assert anchor["prune.importance"] == "l2"  # no direction: the space's first choice
    ratios = [p for p in params["prune"] if isinstance(p, FloatParam)]
    assert ratios and all(p.neutral == p.low for p in ratios)
    # a space whose methods all stay out of the anchors gets none (it would enqueue the base model)
    assert _compresses(mild, concrete)
    only_lowrank = load_space(_write(tmp_path, "[lowrank]\nrank_ratio = [0.25, 1.0]\n"), registry.methods)
    lowrank_concrete = only_lowrank.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    assert lowrank_concrete.size() > 0
    assert not _compresses(_anchor_params(lowrank_concrete, 0.85), lowrank_concrete)
    assert anchors(lowrank_concrete) == []
    # first, quantization alone: the mildest anchor with every structural parameter neutral (no pruning)
    alone, *uniform = anchors(concrete)
    assert uniform == [mild, _anchor_params(concrete, 0.67), strong]
    assert alone == {**mild, **{f"prune.{p.name}": 0.0 for p in ratios}} and all(p.low == 0.0 for p in ratios)
    # a space without quantization gets no such anchor
    prune_only = load_space(_write(tmp_path, "[prune]\nratio = [0.0, 0.8]\n"), registry.methods)
    prune_concrete = prune_only.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    assert len(anchors(prune_concrete)) == 3
    for p in ratios:
        assert p.low < mild[f"prune.{p.name}"] < strong[f"prune.{p.name}"] <= p.high


def test_an_optional_method_is_switched_off_as_a_whole(tmp_path, registry, tiny_workload, tiny_onnx):
    """``optional = true`` adds one on/off parameter, sampled first; when off, no other parameter
    of the method is sampled and the candidate is built without it."""
    import optuna

    from autocomp.candidate import build_structure
    from autocomp.method import BaseModelInfo, CandidateContext

    path = _write(tmp_path, "[prune]\noptional = true\nratio = [0.2, 0.6]\nround_to = 8\n")
    space = load_space(path, registry.methods)
    assert space.optional == {"prune"}
    target = registry.target("cpu")
    concrete = space.concrete(BaseModelInfo(tiny_workload.model, tiny_workload.example_input, tiny_onnx, target))
    (_, _, params), = concrete.entries
    assert params[0].name == "enabled" and params[0].choices == (False, True)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"prune.enabled": False})
    study.enqueue_trial({"prune.enabled": True})
    off, on = concrete.sample(study.ask()), concrete.sample(study.ask())
    assert off.settings["prune"] == {"enabled": False}
    assert on.settings["prune"]["enabled"] is True and len(on.settings["prune"]) == len(params)
    ctx = CandidateContext(workload=tiny_workload, teacher=tiny_workload.model, target=target, work_dir=tmp_path, seed=0)
    unpruned = build_structure(tiny_workload.model, off, concrete, ctx)
    pruned = build_structure(tiny_workload.model, on, concrete, ctx)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unpruned) == count(tiny_workload.model) > count(pruned)


def test_no_recovery_runs_where_the_structural_methods_change_nothing(tmp_path, registry, tiny_workload, tiny_onnx):
    """Pruning at 0 everywhere builds the base model itself: no batch-norm re-estimation and no
    fine-tuning (a draw of training noise with nothing to recover), so quantization alone in a
    joint space is quantization alone; the recovery settings of such a candidate, an optional
    recovery method's on/off switch included, then build the same model and share one canonical
    form. Any pruning is recovered as before."""
    import optuna
    import torch

    from autocomp.candidate import build_model
    from autocomp.method import BaseModelInfo, CandidateContext

    recovery = "[distill]\ntemperature = [1.0, 8.0]\nalpha = [0.0, 0.9]\nsteps = 20\n"
    path = _write(tmp_path, "[prune]\nratio = [0.0, 0.6]\nround_to = 8\n" + recovery)
    target = registry.target("cpu")
    base = tiny_workload.model
    info = BaseModelInfo(base, tiny_workload.example_input, tiny_onnx, target)
    concrete = load_space(path, registry.methods).concrete(info)
    (prune, ratios), (distill, _) = [(m, ps) for m, _, ps in concrete.entries]
    assert prune.name == "prune" and distill.name == "distill" and len(ratios) > 1
    unpruned = {f"prune.{p.name}": 0.0 for p in ratios}
    pruned = {**unpruned, f"prune.{ratios[0].name}": 0.5}
    assert concrete.structure_unchanged(unpruned) and not concrete.structure_unchanged(pruned)

    def build(params):
        ctx = CandidateContext(workload=tiny_workload, teacher=base, target=target, work_dir=tmp_path, seed=0)
        spec = concrete.sample(optuna.trial.FixedTrial({**params, "distill.temperature": 4.0, "distill.alpha": 0.5}))
        return build_model(base, spec, concrete, ctx), ctx

    def same_weights(model):
        mine, theirs = model.state_dict(), base.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, ctx = build(unpruned)
    assert same_weights(model) and model is not base
    assert ctx.notes["structure_unchanged"] is True and "recovery_skipped" in ctx.notes
    assert "distill_steps" not in ctx.notes and "bn_recalibrated" not in ctx.notes
    model, ctx = build(pruned)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())
    assert ctx.notes["distill_steps"] == 20 and ctx.notes["bn_recalibrated"] is True
    assert "recovery_skipped" not in ctx.notes and "structure_unchanged" not in ctx.notes
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base model is untouched
    # the distillation settings of an unpruned candidate do not tell candidates apart; of a pruned one they do
    one, other = {"distill.temperature": 2.0, "distill.alpha": 0.1}, {"distill.temperature": 6.0, "distill.alpha": 0.8}
    assert concrete.canonical({**unpruned, **one}) == concrete.canonical({**unpruned, **other}) == unpruned
    assert concrete.canonical({**pruned, **one}) != concrete.canonical({**pruned, **other})
    # a partial setting (some ratios left to the sampler) keeps its recovery settings
    partial = {f"prune.{ratios[0].name}": 0.0, **one}
    assert not concrete.structure_unchanged(partial)
    assert concrete.canonical(partial) == {**partial, "distill.steps": 20}
    # an optional recovery method, on or off, builds the same unpruned candidate
    path = _write(tmp_path, "[prune]\nratio = [0.0, 0.6]\nround_to = 8\n" + recovery + "optional = true\n")
    gated = load_space(path, registry.methods).concrete(info)
    off = gated.canonical({**unpruned, "distill.enabled": False})
    assert gated.canonical({**unpruned, "distill.enabled": True, **one}) == off == {**unpruned, "distill.enabled": False}
    assert gated.canonical({**pruned, "distill.enabled": True, **one}) != gated.canonical({**pruned, "distill.enabled": False})


def test_a_space_whose_recovery_can_never_run_says_so(tmp_path, registry, caplog):
    """Recovery trains back what a structural method changed: in a space without one it never runs,
    and loading the space warns."""
    import logging

    with caplog.at_level(logging.WARNING, logger="autocomp"):
        load_space(_write(tmp_path, "[distill]\nsteps = 20\n\n[quantize]\nbits = [8, 32]\n"), registry.methods)
    assert "[distill] never runs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autocomp"):
        load_space(_write(tmp_path, "[prune]\nratio = [0.0, 0.6]\n\n[distill]\nsteps = 20\n"), registry.methods)
    assert "never runs" not in caplog.text


def test_a_parameter_named_enabled_is_only_a_switch_for_optional_methods(tmp_path):
    """A method's own parameter called ``enabled`` is an ordinary parameter unless the space marks
    the method optional, in which case the clash is an error naming the table."""
    import optuna

    from autocomp.method import BaseModelInfo, ChoiceParam, Method
    from autocomp.space import parse_space

    class Toggle(Method):
        name, stage, config_type = "toggle", "structural", dict

        def parse_config(self, table, source):
            return dict(table)

        def parameters(self, config, base):
            return [ChoiceParam("enabled", (False, True)), FloatParam("ratio", 0.1, 0.9)]

        def apply(self, model, setting, config, ctx):
            return model

    base = BaseModelInfo(None, None, tmp_path / "m.onnx", None)
    concrete = parse_space({"toggle": {}}, {"toggle": Toggle()}, source="s.toml").concrete(base)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"toggle.enabled": False, "toggle.ratio": 0.5})
    assert concrete.sample(study.ask()).settings["toggle"] == {"enabled": False, "ratio": 0.5}
    with pytest.raises(SpaceError, match=r"s.toml: \[toggle\] method has a parameter named 'enabled'"):
        parse_space({"toggle": {"optional": True}}, {"toggle": Toggle()}, source="s.toml").concrete(base)


@pytest.mark.parametrize("text, expected", [
    ("[prune]\noptional = 1\n", r"\[prune.optional\] must be true or false, got 1"),
    ("prune = 3\n", r"\[prune\] must be a table"),
])
def test_bad_optional_flags_are_named(tmp_path, registry, text, expected):
    with pytest.raises(SpaceError, match=expected):
        load_space(_write(tmp_path, text), registry.methods)


def test_benchmark_hypervolume_against_hand_computed_areas():
    """The 2-D hypervolume used by benchmarks/joint_vs_single.py, on cases worked out by hand."""
    hv = _benchmark_module("joint_vs_single").hypervolume
    # one point: (acc 0.9, 2 ms) against ref (0.8, 10 ms) -> (10 - 2) * (0.9 - 0.8) = 0.8
    assert hv([(0.9, 2.0)], 0.8, 10.0) == pytest.approx(0.8)
    # two points: (0.95, 5) and (0.85, 1): [1,5) at 0.05 + [5,10) at 0.15 = 0.2 + 0.75
    assert hv([(0.95, 5.0), (0.85, 1.0)], 0.8, 10.0) == pytest.approx(0.95)
    # a dominated point adds nothing; points beyond the reference add nothing
    assert hv([(0.95, 5.0), (0.85, 1.0), (0.84, 6.0), (0.7, 0.5), (0.99, 12.0)], 0.8, 10.0) == pytest.approx(0.95)


def _benchmark_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_median_attainment_surface_against_hand_worked_cases():
    """benchmarks/joint_attainment.py: the goals (accuracy, speedup) more than half of the runs attain."""
    att = _benchmark_module("joint_attainment")

    def front(*points):
        return [{"accuracy": a, "speedup": s} for a, s in points]

    runs = [front((0.99, 2.0), (0.97, 6.0)), front((0.98, 4.0)), front((0.99, 3.0), (0.96, 8.0))]
    # (0.99, 2) is attained by runs 1 and 3; (0.98, 3) by all three; (0.97, 4) by runs 1 and 2 ...
    assert att.median_surface(runs, "accuracy", 0.95) == [(0.99, 2.0), (0.98, 3.0), (0.97, 4.0), (0.96, 6.0)]
    # goals below the floor are not goals
    assert att.median_surface(runs, "accuracy", 0.975) == [(0.99, 2.0), (0.98, 3.0)]
    # one run: its own front
    assert att.median_surface(runs[:1], "accuracy", 0.9) == [(0.99, 2.0), (0.97, 6.0)]
    # two runs: more than half is both
    assert att.median_surface(runs[:2], "accuracy", 0.9) == [(0.98, 2.0), (0.97, 4.0)]
    assert att.attained_by(runs, "accuracy", (0.97, 6.0)) == 1
    # what the joint front lacks at each point it misses: (0.99, 2) and (0.97, 4) are attained;
    # at 3x its best is 0.98 (0.01 short of 0.99), and nothing of it is as fast as 9x
    joint = front((0.99, 2.0), (0.98, 4.0))
    assert att.shortfalls(front((0.99, 2.0), (0.99, 3.0), (0.97, 4.0), (0.95, 9.0)), joint, "accuracy") == [
        pytest.approx(0.01), math.inf]
    # a point below the budget is no goal: nothing to miss
    assert att.shortfalls(front((0.99, 3.0), (0.95, 9.0)), joint, "accuracy", floor=0.96) == [pytest.approx(0.01)]
    assert att._finite({"a": [1.0, math.inf], "b": {"c": -math.inf}}) == {"a": [1.0, None], "b": {"c": None}}
    # every pair of distinct runs: a search against itself never pairs a run with itself
    pairs = att.pairwise({"joint": [joint, runs[1]], "prune": runs, "quantize": [front((0.9, 1.0))]}, "accuracy")
    assert pairs["joint over quantize"] == {"pairs": 2, "dominated": 2, "shortfalls": []}
    assert pairs["joint over joint"]["pairs"] == 2 and pairs["prune over prune"]["pairs"] == 6
    # both joint runs dominate run 2; the first misses run 1's (0.97, 6) and run 3's (0.96, 8)
    # entirely (nothing as fast) and run 3's (0.99, 3) by 0.01; the second misses run 1's (0.99, 2)
    # and run 3's (0.99, 3) by 0.01, and the same two fast points entirely
    over_prune = pairs["joint over prune"]
    assert (over_prune["pairs"], over_prune["dominated"]) == (6, 2)
    assert over_prune["shortfalls"] == pytest.approx([0.01] * 3 + [math.inf] * 4)


def test_benchmark_finetune_noise_summary_against_hand_worked_cases():
    """benchmarks/finetune_noise.py: the spread of one setting's draws, per split, and how the two
    splits' scores of a draw go together."""
    noise = _benchmark_module("finetune_noise")
    draws = [{"val": 0.98, "test": 0.97}, {"val": 0.99, "test": 0.99}, {"val": 0.97, "test": 0.98}]
    s = noise.summarise(draws, {"val": 400, "test": 200})
    assert s["draws"] == 3 and s["val"]["images"] == 400 and s["test"]["one_image_pts"] == pytest.approx(0.5)
    assert (s["val"]["median"], s["val"]["min"], s["val"]["max"]) == pytest.approx((98.0, 97.0, 99.0))
    assert s["val"]["sd"] == pytest.approx((2 / 3) ** 0.5)  # deviations -1, 0, 1 points; population sd
    # val deviations (0, 1, -1), test deviations (-1, 1, 0) around 98: covariance 1, variances 2 and 2
    assert s["val_test_correlation"] == pytest.approx(0.5)
    assert noise.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(noise.pearson([1, 1], [2, 3]))  # no spread: no correlation


def test_toggles_follow_the_front_leaving_out_or_putting_in_one_method_each(registry, tiny_zoo):
    """A real study on the joint space with a made-up objective: members of the feasible front are
    tried again with one optional method toggled (left out where it was on, put in where it was off),
    everything else fixed and with the member's fine-tuning seed, paced to the share of the trials
    finished so far, newest member first, never twice; trials off the front and infeasible ones get none."""
    import math
    import random

    import optuna
    from optuna.trial import TrialState

    from autocomp.proposals import SEED_OF, TOGGLE_ATTRS, MethodToggles, _agrees, _setting

    concrete = _joint_space(registry, tiny_zoo)
    toggles = MethodToggles(concrete, trials=60, share=0.2)
    assert toggles.gated == ["remove_blocks", "lowrank", "quantize"] and toggles.budget == 12
    assert [toggles.allowed(n) for n in (0, 1, 5, 6, 59, 60, 80)] == [0, 1, 1, 2, 12, 12, 12]

    def objective(trial):
        concrete.sample(trial)
        rng = random.Random(trial.number)
        trial.set_constraint("max_drop", -1.0 if trial.number % 4 else 1.0)  # every 4th infeasible
        return rng.random() + trial.number / 30, rng.random()  # later trials tend to join the front

    front_when_enqueued, newest_first = {}, []

    def watch(study, trial):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        toggles(study, trial)
        trials = study.get_trials(deepcopy=False)
        front = sorted((t.number for t in study.best_trials), reverse=True)
        new = [t for t in trials if t.state == TrialState.WAITING and t.number not in before]
        for t in new:
            front_when_enqueued[t.number] = front
        finished = sum(t.state.is_finished() for t in trials)
        assert sum(TOGGLE_ATTRS[False][0] in t.user_attrs or TOGGLE_ATTRS[True][0] in t.user_attrs
                   for t in trials) <= math.ceil(0.2 * finished)
        # newest member first: every member newer than a toggle's source had all its toggles tried or waiting
        members = {t.number: t for t in study.best_trials}
        for t in new:
            source = t.user_attrs.get(TOGGLE_ATTRS[False][0], t.user_attrs.get(TOGGLE_ATTRS[True][0]))
            newer = [proposal for n in front if n > source for _, _, proposal in toggles.proposals(members[n].params)]
            newest_first.append(all(any(_agrees(proposal, _setting(o)) for o in trials) for proposal in newer))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=60, callbacks=[watch])
    trials = study.get_trials(deepcopy=False)
    made = {switched_on: [t for t in trials if TOGGLE_ATTRS[switched_on][0] in t.user_attrs]
            for switched_on in (False, True)}
    assert len(made[False]) + len(made[True]) == toggles.budget
    assert made[False] and made[True]  # both directions occur
    assert newest_first and all(newest_first)
    # spread over the run, not all after the first few trials
    assert max(t.number for t in made[False] + made[True]) > 40
    for switched_on, (source_key, method_key) in TOGGLE_ATTRS.items():
        for t in made[switched_on]:
            assert t.state == TrialState.COMPLETE  # enqueued trials run
            source, method = trials[t.user_attrs[source_key]], t.user_attrs[method_key]
            assert source.number in front_when_enqueued[t.number] and source.number % 4
            gate = f"{method}.enabled"
            assert source.params[gate] is not switched_on and t.params[gate] is switched_on
            # the toggled method's own parameters appear exactly when it is on
            assert any(k.startswith(f"{method}.") and k != gate for k in t.params) is switched_on
            kept = {k: v for k, v in source.params.items() if not k.startswith(f"{method}.")}
            assert all(t.params[k] == v for k, v in kept.items() if k in t.params)
            # only a block removal put in hides parameters (the pruning ratios of the blocks it removes)
            hidden = set(kept) - set(t.params)
            assert not hidden or (method, switched_on) == ("remove_blocks", True)
            assert t.user_attrs[SEED_OF] == source.user_attrs.get(SEED_OF, source.number)
    settings = [sorted(t.params.items(), key=str) for t in made[False] + made[True]]
    assert len(settings) == len({str(s) for s in settings})


def test_no_ablation_of_a_method_that_changes_nothing(registry, tiny_zoo):
    """Block removal switched on with no block removed builds the same model as switched off, and so
    does quantization with every layer at fp32."""
    from autocomp.proposals import MethodToggles

    concrete = _joint_space(registry, tiny_zoo)
    blocks = [f"remove_blocks.{p.name}" for m, _, ps in concrete.entries if m.name == "remove_blocks"
              for p in ps if p.name != "enabled"]
    params = {"remove_blocks.enabled": True, **{b: False for b in blocks}, "prune.importance": "l2",
              "lowrank.enabled": False, "quantize.enabled": True, "quantize.stem.0": "int8"}
    toggles = MethodToggles(concrete, 20)
    # low-rank, off, is put in; quantization, on, is left out
    assert [(m, on) for m, on, _ in toggles.proposals(params)] == [("lowrank", True), ("quantize", False)]
    params[blocks[0]] = True
    assert [(m, on) for m, on, _ in toggles.proposals(params)] == [
        ("remove_blocks", False), ("lowrank", True), ("quantize", False)]
    (_, _, without), = [p for p in toggles.proposals(params) if p[0] == "quantize"]
    assert without == {**{k: v for k, v in params.items() if not k.startswith("quantize.")}, "quantize.enabled": False}
    # quantization on with the whole model at fp32 changes nothing either: it is not left out but
    # put in with its anchor setting, every layer int8 (block removal, with nothing of its own to
    # bring in, is neither)
    params = {"remove_blocks.enabled": True, **{b: False for b in blocks}, "prune.importance": "l2",
              "lowrank.enabled": False, "quantize.enabled": True, "quantize.all_layers": "fp32"}
    assert [(m, on) for m, on, _ in toggles.proposals(params)] == [("lowrank", True), ("quantize", True)]
    (_, _, added), = [p for p in toggles.proposals(params) if p[0] == "quantize"]
    assert added == {**params, "quantize.all_layers": "int8"}


def test_quantization_is_put_in_with_every_kept_layer_at_its_anchor_precision(registry, tiny_zoo):
    """An addition of a method that takes part in the anchors (quantization) brings its anchor
    setting, every layer at the strongest precision, except the layers of a block the member removes
    (or, where the space samples whether to choose per layer, as the shipped joint space does, the
    whole model at that precision); an addition of one that does not (low-rank) leaves its parameters
    to the sampler."""
    import tomllib

    from autocomp.method import BaseModelInfo
    from autocomp.proposals import MethodToggles, anchors
    from autocomp.space import parse_space

    model, x, onnx_path = tiny_zoo("resnet20")
    info = BaseModelInfo(model, x, onnx_path, registry.target("jetson"))
    shipped = load_space(default_space_path().with_name("joint.toml"), registry.methods)
    data = tomllib.loads(shipped.text)
    data["quantize"]["per_layer"] = True
    for space in (parse_space(data, registry.methods, source="per-layer"), shipped):
        concrete = space.concrete(info)
        (quantize,) = [ps for m, _, ps in concrete.entries if m.name == "quantize"]
        blocks = [p.name for m, _, ps in concrete.entries if m.name == "remove_blocks" for p in ps if p.name != "enabled"]
        layers = {f"quantize.{p.name}": p for p in quantize if p.name not in ("enabled", "all_layers")}
        inside = [k for k, p in layers.items() if p.module and p.module.startswith(blocks[0] + ".")]
        assert inside and len(inside) < len(layers)
        toggles = MethodToggles(concrete, 20)
        params = {"remove_blocks.enabled": True, **{f"remove_blocks.{b}": b == blocks[0] for b in blocks},
                  "prune.importance": "l2", "lowrank.enabled": False, "quantize.enabled": False}
        added = {m: moved for m, on, moved in toggles.proposals(params) if on}
        if space is shipped:
            assert anchors(concrete)[0]["quantize.all_layers"] == "int8"
            assert added["quantize"] == {**params, "quantize.enabled": True, "quantize.all_layers": "int8"}
        else:
            strongest = {k: v for k, v in anchors(concrete)[0].items() if k in layers}
            assert set(strongest) == set(layers) and set(strongest.values()) == {"int8"}
            assert added["quantize"] == {**params, "quantize.enabled": True,
                                         **{k: v for k, v in strongest.items() if k not in inside}}
        assert added["lowrank"] == {**params, "lowrank.enabled": True}


def test_a_toggle_a_stopped_run_left_is_enqueued_again(registry, tiny_zoo):
    """A toggle (ablation or addition) failed by a stop (also before it started) does not use up the
    budget and is enqueued again, once; one whose candidate failed is not, nor one whose process
    died (closed on resume with no reason: its candidate may be what crashes it)."""
    import optuna
    from optuna.trial import TrialState

    from autocomp.proposals import ABLATION_OF, ADDITION_OF, STEP_OF, STEPPED, MethodToggles, StrengthSteps

    concrete = _joint_space(registry, tiny_zoo)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    ablation, addition = {ABLATION_OF: 0, "ablated": "quantize"}, {ADDITION_OF: 0, "added": "lowrank"}
    for params, attrs, reason in (
            ({"prune.importance": "l2", "quantize.enabled": False}, ablation, "KeyboardInterrupt: "),
            ({"prune.importance": "taylor", "lowrank.enabled": True}, addition,
             "KeyboardInterrupt: stopped before it started"),
            ({"prune.importance": "l2", "lowrank.enabled": False}, ablation, "CandidateError: no"),
            ({"prune.importance": "taylor", "quantize.enabled": False}, ablation, None)):
        study.enqueue_trial(params, user_attrs=attrs)
        trial = study.ask()
        if reason:
            trial.set_user_attr("failure_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
    toggles = MethodToggles(concrete, 20)
    assert toggles.requeue_interrupted(study) == 2
    assert toggles.requeue_interrupted(study) == 0  # already waiting
    waiting = sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)),
                     key=lambda t: t.system_attrs["fixed_params"]["prune.importance"])
    assert [t.system_attrs["fixed_params"]["prune.importance"] for t in waiting] == ["l2", "taylor"]
    assert [t.user_attrs for t in waiting] == [ablation, addition]
    # a strength step is requeued by the steps, not by the toggles; not one whose setting a finished
    # trial has (its ratio differing only by float error)
    step = {STEP_OF: 0, STEPPED: "stronger"}
    setting = {"prune.importance": "l2", "lowrank.enabled": True}
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({**setting, "prune.ratio": 0.30000000000000004})
    study.tell(study.ask(), [0.9, 1.0])
    for ratio in (0.3, 0.45):
        study.enqueue_trial({**setting, "prune.ratio": ratio}, user_attrs=step)
        trial = study.ask()
        trial.set_user_attr("failure_reason", "KeyboardInterrupt: ")
        study.tell(trial, state=TrialState.FAIL)
    steps = StrengthSteps(concrete, 20)
    assert toggles.requeue_interrupted(study) == 0
    assert steps.requeue_interrupted(study) == 1 and steps.requeue_interrupted(study) == 0
    (requeued,) = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if steps.mine(t)]
    assert requeued.user_attrs == step and requeued.system_attrs["fixed_params"]["prune.ratio"] == 0.45


def test_a_setting_a_stop_cut_short_is_not_tried_and_paces_nothing(registry, tiny_zoo):
    """A trial a stop cut short has not tried its setting (a proposal may queue it) and counts as no
    finished trial when the proposals are paced; a trial whose candidate failed has tried its."""
    import optuna
    from optuna.trial import TrialState

    from autocomp.proposals import MethodToggles, tried

    concrete = _joint_space(registry, tiny_zoo)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    setting = {"prune.importance": "l2", "quantize.enabled": False}
    for reason in ("KeyboardInterrupt: stopped before it started", "CandidateError: no"):
        study.enqueue_trial(setting)
        trial = study.ask()
        trial.set_user_attr("failure_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        assert tried(concrete, study.get_trials(deepcopy=False), setting) is reason.startswith("CandidateError")
    # a front member, then three trials a stop cut short: a budget of 4 still has room for a toggle
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({**setting, "remove_blocks.enabled": False, "lowrank.enabled": False})
    member = study.ask()
    concrete.sample(member)
    study.tell(member, (0.9, 1.0))
    for _ in range(3):
        study.enqueue_trial(setting)
        trial = study.ask()
        trial.set_user_attr("failure_reason", "KeyboardInterrupt: ")
        study.tell(trial, state=TrialState.FAIL)
    MethodToggles(concrete, trials=4, share=1.0)(study, study.trials[-1])
    (waiting,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert waiting.user_attrs["addition_of"] == member.number


def test_a_setting_already_tried_is_recognised_through_float_error():
    from autocomp.proposals import _agrees
    from autocomp.space import same_value

    assert same_value(0.30000000000000004, 0.3) and same_value(3, 3) and same_value("int8", "int8")
    assert not same_value(0.3, 0.3 + 1e-6) and not same_value("int8", "fp32")
    assert _agrees({"prune.ratio": 0.3}, {"prune.ratio": 0.1 + 0.2, "prune.importance": "l2"})
    assert not _agrees({"prune.ratio": 0.3, "lowrank.enabled": True}, {"prune.ratio": 0.3})


def test_toggles_do_not_toggle_back_retry_a_failure_or_outrun_the_budget(registry, tiny_zoo):
    """A member that is itself an ablation of block removal is not given block removal back (its
    source, with the block's pruning ratio drawn anew, would be tried again); a toggle
    that failed (with no reason recorded, as when the objective returns NaN) is not enqueued again;
    and nothing is enqueued once the waiting trials fill the rest of the budget."""
    import optuna
    from optuna.trial import TrialState

    from autocomp.proposals import ABLATED, ABLATION_OF, ADDED, ADDITION_OF, MethodToggles

    concrete = _joint_space(registry, tiny_zoo)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    off = {"remove_blocks.enabled": False, "prune.importance": "l2", "lowrank.enabled": False}

    def run(params, values, attrs=None):  # params None: the next waiting trial
        if params is not None:
            study.enqueue_trial(params, user_attrs=attrs or {})
        trial = study.ask()
        concrete.sample(trial)
        study.tell(trial, values, state=TrialState.COMPLETE if values else TrialState.FAIL)
        return study.get_trials(deepcopy=False)[trial.number]

    blocks = [f"remove_blocks.{p.name}" for m, _, ps in concrete.entries if m.name == "remove_blocks"
              for p in ps if p.name != "enabled"]
    for _ in range(10):  # dominated trials, so the pacing allows several toggles at once
        run({**off, "quantize.enabled": False}, (0.1, 10.0))
    # the source removes a block; the member is its ablation, so the block's pruning ratio is drawn anew
    source = run({**off, "remove_blocks.enabled": True, blocks[0]: True, **{b: False for b in blocks[1:]},
                  "quantize.enabled": False}, (0.9, 1.0))
    member = run({**{k: v for k, v in source.params.items() if not k.startswith("remove_blocks.")},
                  "remove_blocks.enabled": False}, (0.95, 0.5), {ABLATION_OF: source.number, ABLATED: "remove_blocks"})
    assert set(member.params) - set(source.params)  # the ratio the removal had hidden
    assert [t.number for t in study.best_trials] == [member.number]

    MethodToggles(concrete, trials=12, share=1.0)(study, member)  # 12 finished of 12: no room
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    toggles = MethodToggles(concrete, trials=40, share=1.0)
    toggles(study, member)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [(t.user_attrs[ADDITION_OF], t.user_attrs[ADDED]) for t in waiting] == [
        (member.number, "lowrank"), (member.number, "quantize")]  # not block removal back

    # the first fails without a reason; it is not enqueued again, nor anything else
    failed = run(None, None)
    assert failed.user_attrs[ADDED] == "lowrank" and failed.state == TrialState.FAIL
    toggles(study, failed)
    assert [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))] == [waiting[1].number]


def test_siblings_use_no_trial_of_the_proposals_budget(registry, tiny_zoo):
    """Siblings are trials in the study but not of the budget: a study whose trials fill all but one
    of the budget still gets one toggle however many siblings it holds."""
    import optuna
    from optuna.trial import TrialState

    from autocomp.proposals import SIBLING_OF, MethodToggles

    concrete = _joint_space(registry, tiny_zoo)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    off = {"remove_blocks.enabled": False, "prune.importance": "l2", "lowrank.enabled": False, "quantize.enabled": False}
    for values in [(0.1, 10.0)] * 11 + [(0.9, 1.0)]:
        study.enqueue_trial(off)
        trial = study.ask()
        concrete.sample(trial)
        study.tell(trial, values)
    member = study.best_trials[0]
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(params=member.params, distributions=member.distributions,
                                                  values=[0.1, 10.0], user_attrs={SIBLING_OF: member.number}))
    MethodToggles(concrete, trials=13, share=1.0)(study, member)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) == 1


def test_strength_steps_move_every_sampled_compression_range_one_step(registry, tiny_zoo):
    """A step moves each pruning ratio and rank ratio the member sampled by a share of its range's
    width (kept on the ratio's grid and inside the range), toward the strong end or the neutral end;
    choices and everything without a direction stay as they are; a direction that changes nothing is
    not proposed."""
    from types import SimpleNamespace

    from autocomp.proposals import MILDER, SEED_OF, STEP_OF, STEPPED, STRONGER, StrengthSteps

    concrete = _joint_space(registry, tiny_zoo)
    steps = StrengthSteps(concrete, trials=60, share=0.15, size=0.15)
    assert steps.budget == 9
    ratios = [k for k in steps.ranges if k.startswith("prune.")]
    ranks = [k for k in steps.ranges if k.startswith("lowrank.")]
    assert len(ratios) >= 2 and ranks
    assert not any(k.startswith(("distill.", "quantize.", "remove_blocks.")) for k in steps.ranges)
    params = {"remove_blocks.enabled": False, "prune.importance": "taylor", ratios[0]: 0.3, ratios[1]: 0.8,
              "lowrank.enabled": True, ranks[0]: 0.5, "distill.temperature": 4.0,
              "quantize.enabled": True, "quantize.stem.0": "int8"}
    (d1, stronger), (d2, milder) = steps.steps(params)
    assert (d1, d2) == (STRONGER, MILDER)
    # 0.15 of [0, 0.8] is 0.12: 0.3 + 0.12 lands on the 0.05 grid at 0.4; 0.8 is already the strong end
    assert stronger[ratios[0]] == pytest.approx(0.4) and stronger[ratios[1]] == 0.8
    assert milder[ratios[0]] == pytest.approx(0.2) and milder[ratios[1]] == pytest.approx(0.7)
    # a rank ratio's strong end is its low end: 0.15 of [0.25, 1.0] is 0.1125, no grid
    assert stronger[ranks[0]] == pytest.approx(0.3875) and milder[ranks[0]] == pytest.approx(0.6125)
    for moved in (stronger, milder):
        assert {k: v for k, v in moved.items() if k not in steps.ranges} == \
            {k: v for k, v in params.items() if k not in steps.ranges}
    # every range already at its neutral end: only the stronger step changes something
    neutral = {**params, ratios[0]: 0.0, ratios[1]: 0.0, ranks[0]: 1.0}
    assert [d for d, _ in steps.steps(neutral)] == [STRONGER]
    assert steps.steps({"prune.importance": "l2"}) == []  # no range sampled, nothing to move
    # on a grid a step is a whole number of grid steps, at least one: a narrow range still moves
    from autocomp.method import IntParam
    from autocomp.proposals import _step
    narrow = FloatParam("r", 0.0, 0.15, step=0.05, neutral=0.0)
    assert [_step(narrow, 0.05, 0.15, toward_neutral) for toward_neutral in (False, True)] == [0.1, 0.0]
    few = IntParam("n", 1, 4, neutral=1)
    assert [_step(few, 2, 0.15, toward_neutral) for toward_neutral in (False, True)] == [3, 1]
    assert _step(FloatParam("t", 0.0, 0.5, step=0.05, neutral=0.0), 0.1, 0.15, False) == pytest.approx(0.2)
    # a member that is a stronger step is not stepped milder, back toward where it came from
    member = SimpleNamespace(number=7, params=params, user_attrs={STEP_OF: 3, STEPPED: STRONGER, SEED_OF: 3})
    assert [(attrs, moved) for attrs, moved, _ in steps.variants(member)] == [
        ({STEP_OF: 7, STEPPED: STRONGER}, stronger)]


def test_strength_steps_follow_the_front_paced_without_stepping_back(registry, tiny_zoo):
    """In a real study, steps vary members of the front at the time, newest first, within their share
    of the trials finished so far, with the member's seed, never twice, and a step's own member is
    not stepped back the way it came."""
    import math
    import random

    import optuna
    from optuna.trial import TrialState

    from autocomp.method import BaseModelInfo
    from autocomp.proposals import MILDER, SEED_OF, STEP_OF, STEPPED, STRONGER, StrengthSteps

    model, x, onnx_path = tiny_zoo("resnet20")
    space = load_space(default_space_path(), registry.methods)  # pruning alone: no optional method
    concrete = space.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    steps = StrengthSteps(concrete, trials=40, share=0.25)
    assert steps.budget == 10

    def objective(trial):
        concrete.sample(trial)
        rng = random.Random(trial.number)
        trial.set_constraint("max_drop", -1.0 if trial.number % 4 else 1.0)  # every 4th infeasible
        return rng.random() + trial.number / 20, rng.random()

    front_when_enqueued = {}

    def watch(study, trial):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        steps(study, trial)
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == TrialState.WAITING and t.number not in before:
                front_when_enqueued[t.number] = {m.number for m in study.best_trials}
        assert sum(STEP_OF in t.user_attrs for t in trials) <= math.ceil(0.25 * sum(t.state.is_finished() for t in trials))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(objective, n_trials=40, callbacks=[watch])
    trials = study.get_trials(deepcopy=False)
    made = [t for t in trials if STEP_OF in t.user_attrs]
    assert len(made) == steps.budget and max(t.number for t in made) > 25
    assert {t.user_attrs[STEPPED] for t in made} == {STRONGER, MILDER}
    for t in made:
        source = trials[t.user_attrs[STEP_OF]]
        assert t.state == TrialState.COMPLETE and source.number in front_when_enqueued[t.number]
        assert t.user_attrs[SEED_OF] == source.user_attrs.get(SEED_OF, source.number)
        sign = 1 if t.user_attrs[STEPPED] == STRONGER else -1
        moved = [k for k in steps.ranges if k in source.params]
        assert set(t.params) == set(source.params)
        assert all(sign * (t.params[k] - source.params[k]) >= -1e-9 for k in moved)
        assert any(abs(t.params[k] - source.params[k]) > 1e-9 for k in moved)
        back = {STRONGER: MILDER, MILDER: STRONGER}.get(source.user_attrs.get(STEPPED))
        assert t.user_attrs[STEPPED] != back
    settings = [str(sorted(t.params.items())) for t in trials]
    assert len(settings) == len(set(settings))


def test_no_proposal_and_no_sibling_is_the_base_model_itself(tmp_path, registry, tiny_zoo):
    """Pruning at its mildest step above 0 without quantization: its milder step would be the base
    model (measured apart, never a trial), and so would quantization left out of quantization
    alone; neither is queued nor built."""
    import optuna
    from optuna.trial import TrialState

    from autocomp.method import BaseModelInfo
    from autocomp.proposals import MILDER, STEPPED, STRONGER, MethodToggles, StrengthSteps, tried

    model, x, onnx_path = tiny_zoo("resnet20")
    text = ("[prune]\nratio = [0.0, 0.6]\nstep = 0.1\nimportance = [\"l2\", \"taylor\"]\n"
            "scope = [\"group\", \"global\"]\n\n[quantize]\noptional = true\nbits = [8, 32]\n")
    concrete = load_space(_write(tmp_path, text), registry.methods).concrete(
        BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    (_, _, prune), _ = concrete.entries
    groups = [f"prune.{p.name}" for p in prune if p.module is not None]
    light = {"prune.importance": "l2", "prune.scope": "group", **{g: 0.1 for g in groups}, "quantize.enabled": False}
    unpruned = {**light, **{g: 0.0 for g in groups}}
    assert concrete.builds_base_model(unpruned) and not concrete.builds_base_model(light)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(light, user_attrs={STEPPED: MILDER})  # itself a milder step: stepped on milder only
    trial = study.ask()
    concrete.sample(trial)
    study.tell(trial, [0.9, 1.0])
    # a setting is "tried" only by a trial that builds the same candidate (not light pruning for no pruning)
    assert tried(concrete, study.trials, light) and not tried(concrete, study.trials, unpruned)
    steps = StrengthSteps(concrete, trials=40, share=1.0)
    assert [(d, concrete.builds_base_model(p)) for d, p in steps.steps(light)] == [(STRONGER, False), (MILDER, True)]
    steps(study, study.trials[0])
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    alone = {**unpruned, "quantize.enabled": True, "quantize.all_layers": "int8"}
    toggles = MethodToggles(concrete, trials=40, share=1.0)
    assert [(m, on) for m, on, _ in toggles.proposals(alone)] == [("quantize", False)]
    assert toggles.post_export(alone) == []


def test_toggles_and_steps_share_one_study_each_within_its_own_share(registry, tiny_zoo):
    """Both kinds of proposal, as the search wires them, in one real study over the joint space: each
    keeps to its own share, a trial is one kind or the other, no setting is tried twice, and nothing
    is left queued without room to run."""
    import math
    import random

    import optuna
    from optuna.trial import TrialState

    from autocomp.proposals import MethodToggles, StrengthSteps

    concrete = _joint_space(registry, tiny_zoo)
    toggles, steps = MethodToggles(concrete, trials=40), StrengthSteps(concrete, trials=40)

    def objective(trial):
        concrete.sample(trial)
        rng = random.Random(trial.number)
        trial.set_constraint("max_drop", -1.0 if trial.number % 5 else 1.0)
        return rng.random() + trial.number / 20, rng.random()

    def within_shares(study, trial):
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        for kind in (toggles, steps):
            assert sum(kind.mine(t) for t in trials) <= min(kind.budget, math.ceil(kind.share * finished))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=2))
    study.optimize(objective, n_trials=40, callbacks=[toggles, steps, within_shares])
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.WAITING]
    made_toggles, made_steps = [t for t in trials if toggles.mine(t)], [t for t in trials if steps.mine(t)]
    assert made_toggles and made_steps and not {t.number for t in made_toggles} & {t.number for t in made_steps}
    assert len(made_toggles) <= toggles.budget == 10 and len(made_steps) <= steps.budget == 6
    settings = [str(sorted(t.params.items())) for t in trials]
    assert len(settings) == len(set(settings))


def test_settings_that_build_the_same_candidate_have_one_canonical_form(registry, tiny_zoo):
    """Every layer at one precision chosen per layer is that precision for the whole model; an
    optional method on and changing nothing (quantization at fp32 everywhere, block removal removing
    nothing) is the method off; a parameter the trial would not sample goes; a partial setting is not
    completed; a name the space does not declare stays. The toggles use it: a per-layer fp32 member is
    given quantization, not an ablation, and a setting already tried written another way is not
    proposed again."""
    import optuna

    from autocomp.proposals import MethodToggles

    concrete = _joint_space(registry, tiny_zoo)
    entries = {m.name: ps for m, _, ps in concrete.entries}
    layers = [f"quantize.{p.name}" for p in entries["quantize"] if p.name not in ("enabled", "all_layers")]
    blocks = [f"remove_blocks.{p.name}" for p in entries["remove_blocks"] if p.name != "enabled"]
    assert len(layers) > 2 and blocks
    rest = {"remove_blocks.enabled": False, "prune.importance": "l2", "lowrank.enabled": False}
    per_layer = {**rest, "quantize.enabled": True, "quantize.all_layers": "per-layer"}
    whole = {**rest, "quantize.enabled": True, "quantize.all_layers": "int8"}
    off = {**rest, "quantize.enabled": False}
    fixed = concrete.canonical({})  # the values no trial samples (distillation's steps) are filled in
    assert fixed == {"distill.steps": 100}

    def canonical(params):
        form = concrete.canonical(params)
        assert form.items() >= fixed.items()
        return {k: v for k, v in form.items() if k not in fixed}

    assert canonical({**per_layer, **{k: "int8" for k in layers}}) == canonical(whole) == whole
    assert canonical({**per_layer, **{k: "fp32" for k in layers}}) == canonical(off) == off
    assert canonical({**rest, "quantize.enabled": True, "quantize.all_layers": "fp32"}) == off
    mixed = {**per_layer, **{k: "int8" for k in layers}, layers[0]: "fp32"}
    assert canonical(mixed) == mixed
    assert canonical({**mixed, layers[1]: "fp16"}) != canonical(mixed)
    # the layers' precisions are not sampled for the whole model at int8, nor is a switched-off method's
    assert canonical({**whole, layers[0]: "fp32"}) == whole
    assert canonical({**off, "quantize.all_layers": "int8"}) == off
    # block removal on, removing nothing, is block removal off
    nothing_removed = {**whole, "remove_blocks.enabled": True, **{b: False for b in blocks}}
    assert canonical(nothing_removed) == whole
    # a partial setting (the rest left to the sampler) stays partial, even at fp32; an undeclared name stays
    for precision in ("int8", "fp32"):
        partial = {**per_layer, layers[0]: precision}
        assert canonical(partial) == partial
    assert canonical({**whole, "other.knob": 3}) == {**whole, "other.knob": 3}

    toggles = MethodToggles(concrete, trials=40, share=1.0)
    fp32_member = {**per_layer, **{k: "fp32" for k in layers}}
    assert [(m, on) for m, on, _ in toggles.proposals(fp32_member)] == [
        ("remove_blocks", True), ("lowrank", True), ("quantize", True)]
    # a front member with quantization off: its quantization addition (the whole model int8) was
    # already tried as every layer int8, one by one, and is not proposed again
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])

    def run(params, values):
        study.enqueue_trial(params)
        trial = study.ask()
        concrete.sample(trial)
        study.tell(trial, values)
        return study.get_trials(deepcopy=False)[trial.number]

    member = run(off, [0.95, 1.0])
    unquantized = {k: v for k, v in member.params.items() if not k.startswith("quantize.")}
    run({**unquantized, "quantize.enabled": True, "quantize.all_layers": "per-layer", **{k: "int8" for k in layers}},
        [0.90, 1.1])
    assert [t.number for t in study.best_trials] == [member.number]
    toggles(study, member)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["added"] for t in waiting) == ["lowrank", "remove_blocks"]


def test_only_a_method_that_says_so_changes_nothing(registry, tiny_zoo):
    """Neutral values compress least within the space's range, not necessarily not at all: with
    quantization offering int8 and fp16 only, fp16 (its neutral) everywhere is still quantization
    on; a fixed parameter does not keep a method's setting from being complete; a partial setting at
    neutral values stays as written; a method's canonical hook that raises is logged and its setting
    taken as written."""
    import logging
    import tomllib
    import types
    from dataclasses import dataclass

    from autocomp import hookimpl
    from autocomp.method import BaseModelInfo, ChoiceParam, FixedParam, Method
    from autocomp.plugins import load_registry
    from autocomp.space import parse_space

    from .conftest import builtin_plugins

    model, x, onnx_path = tiny_zoo("resnet20")
    info = BaseModelInfo(model, x, onnx_path, registry.target("jetson"))
    data = tomllib.loads(default_space_path().with_name("joint.toml").read_text())
    data["quantize"]["bits"] = [8, 16]
    concrete = parse_space(data, registry.methods, source="no-fp32").concrete(info)
    (quantize,) = [ps for m, _, ps in concrete.entries if m.name == "quantize"]
    assert quantize[1].name == "all_layers" and quantize[1].neutral == "fp16"
    rest = {"remove_blocks.enabled": False, "prune.importance": "l2", "lowrank.enabled": False}
    fp16 = {**rest, "quantize.enabled": True, "quantize.all_layers": "fp16", "distill.steps": 100}
    assert concrete.canonical(fp16) == fp16
    # low-rank on with one layer at full rank and the others left to the sampler: kept as written
    (lowrank,) = [ps for m, _, ps in concrete.entries if m.name == "lowrank"]
    partial = {**fp16, "lowrank.enabled": True, f"lowrank.{lowrank[1].name}": 1.0}
    assert len(lowrank) > 2 and concrete.canonical(partial) == partial
    full_rank = {**fp16, "lowrank.enabled": True, **{f"lowrank.{p.name}": 1.0 for p in lowrank[1:]}}
    assert concrete.canonical(full_rank) == fp16

    @dataclass(frozen=True)
    class _Config:
        pass

    class _Scale(Method):
        """Multiplies by ``factor`` in ``mode``; a factor of 1 changes nothing."""

        name, stage, config_type = "scale", "structural", _Config

        def parameters(self, config, base):
            return [FixedParam("mode", "x"), ChoiceParam("factor", (1, 2, 4), neutral=1)]

        def canonical(self, setting, config):
            if setting["factor"] == 4:
                raise ValueError("no canonical form for 4")
            return setting

        def changes_nothing(self, setting, config):
            return setting == {"mode": "x", "factor": 1}

        def apply(self, model, setting, config, ctx):
            return model

    plugin = types.ModuleType("scale_plugin")
    plugin.register_methods = hookimpl(lambda register: register(_Scale()))
    methods = load_registry(entry_points=[], extra_plugins=[*builtin_plugins(), ("scale", plugin)]).methods
    concrete = parse_space({"scale": {"optional": True}}, methods, source="scale").concrete(info)
    assert concrete.canonical({"scale.enabled": True, "scale.factor": 1}) == {"scale.enabled": False}
    assert concrete.canonical({"scale.enabled": True, "scale.factor": 2}) == {
        "scale.enabled": True, "scale.mode": "x", "scale.factor": 2}
    logger = logging.getLogger("autocomp")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert concrete.canonical({"scale.enabled": True, "scale.factor": 4}) == {
            "scale.enabled": True, "scale.mode": "x", "scale.factor": 4}
    finally:
        logger.removeHandler(handler)
    assert any("no canonical form for 4" in r.getMessage() for r in records)


@pytest.mark.parametrize("declared, expected", [
    (lambda: [FloatParam("ratio", 0.9, 0.1)], r"parameter 'ratio' has low=0.9 > high=0.1"),
    (lambda: [FloatParam("ratio", 0.1, 0.9, neutral=0.5)], r"neutral=0.5; a range's neutral value is one of its ends"),
    (lambda: [FloatParam("ratio", 0.1, 0.9, step=0.0)], r"step=0.0; a step is positive"),
    (lambda: [ChoiceParam("bits", (8, 16), neutral=32)], r"neutral=32, which is not one of its choices \(8, 16\)"),
    (lambda: [ChoiceParam("bits", ())], r"choices=\(\); choices are a non-empty tuple"),
    (lambda: [FloatParam("ratio", 0.1, 0.9, only_if=("mine.scope", "group")), ChoiceParam("scope", ("group", "all"))],
     r"only_if naming 'mine.scope', which is not a parameter declared before it"),
    (lambda: [ChoiceParam("scope", ("group", "all")), FloatParam("ratio", 0.1, 0.9, only_if=("scope", "group"))],
     r"only_if naming 'scope', .*; did you mean 'mine.scope'\?"),
    (lambda: [("ratio", 0.1, 0.9)], r"declared \('ratio', 0.1, 0.9\), which is not a parameter"),
])
def test_a_malformed_parameter_stops_the_search_before_it_starts(tmp_path, declared, expected):
    """A plugin's malformed parameter is a configuration error naming the method and the problem,
    raised while the space is made concrete, not a failure of every trial (or an only_if that
    silently never samples its parameter)."""
    from autocomp.method import BaseModelInfo, Method
    from autocomp.space import parse_space

    class Mine(Method):
        name, stage, config_type = "mine", "structural", dict

        def parse_config(self, table, source):
            return dict(table)

        def parameters(self, config, base):
            return declared()

        def apply(self, model, setting, config, ctx):
            return model

    space = parse_space({"mine": {}}, {"mine": Mine()}, source="s.toml")
    with pytest.raises(SpaceError, match=r"\[mine\] .*" + expected):
        space.concrete(BaseModelInfo(None, None, tmp_path / "m.onnx", None))


def test_only_if_may_name_an_earlier_parameter_or_the_methods_own_switch(tmp_path):
    """The forms the built-in methods use are accepted: a parameter declared before, by the method
    or an earlier one, and an optional method's on/off switch."""
    from autocomp.method import BaseModelInfo, ChoiceParam, Method
    from autocomp.space import GATE, parse_space

    class Mine(Method):
        name, stage, config_type = "mine", "structural", dict

        def parse_config(self, table, source):
            return dict(table)

        def parameters(self, config, base):
            return [ChoiceParam("scope", ("group", "all")), FloatParam("ratio", 0.1, 0.9, only_if=("mine.scope", "all")),
                    FloatParam("gain", 1.0, 2.0, only_if=(f"mine.{GATE}", True))]

        def apply(self, model, setting, config, ctx):
            return model

    space = parse_space({"mine": {"optional": True}}, {"mine": Mine()}, source="s.toml")
    concrete = space.concrete(BaseModelInfo(None, None, tmp_path / "m.onnx", None))
    assert "mine.ratio" in concrete.declared_names and "mine.gain" in concrete.declared_names
