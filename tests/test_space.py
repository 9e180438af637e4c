"""Search-space files: validation errors name the file, the key and what is allowed."""

from __future__ import annotations

import pytest

from autocomp.errors import SpaceError
from autocomp.space import default_space_path, load_space


def _write(tmp_path, text):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


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


def test_concrete_parameters_follow_the_model(tmp_path, registry, tiny_workload):
    from autocomp.export import export_onnx
    from autocomp.method import BaseModelInfo, ChoiceParam, FloatParam

    onnx_path = export_onnx(tiny_workload.model, tiny_workload.example_input, tmp_path / "m.onnx")
    space = load_space(default_space_path(), registry.methods)
    concrete = space.concrete(BaseModelInfo(tiny_workload.model, tiny_workload.example_input, onnx_path,
                                            registry.target("cpu")))
    by_method = {m.name: params for m, _, params in concrete.entries}
    # digits has 7 prunable groups (the classifier is never a root) and 12 quantizable layers: 11 convs (stem, 4 in layer1, 3 each in layer2 and layer3 with their shortcuts) and fc
    assert len(by_method["prune"]) == 7 and all(isinstance(p, FloatParam) for p in by_method["prune"])
    assert {p.name for p in by_method["quantize"]} >= {"stem.0", "layer1.0.conv1", "fc"}
    assert all(isinstance(p, ChoiceParam) and p.choices == ("fp32", "int8") for p in by_method["quantize"])
    assert len(by_method["quantize"]) == 12


def test_quantize_parameters_intersect_target_precisions(tmp_path, registry, tiny_workload):
    from autocomp.export import export_onnx
    from autocomp.method import BaseModelInfo
    from autocomp.target import Target

    class Fp32Only(Target):
        name = "fp32-only"
        precisions = frozenset({"fp32"})

        def latency(self, onnx_path, input_shapes):
            raise AssertionError("not measured in this test")

    onnx_path = export_onnx(tiny_workload.model, tiny_workload.example_input, tmp_path / "m.onnx")
    space = load_space(default_space_path(), registry.methods)
    concrete = space.concrete(BaseModelInfo(tiny_workload.model, tiny_workload.example_input, onnx_path, Fp32Only()))
    assert {m.name: len(p) for m, _, p in concrete.entries}["quantize"] == 0


def test_parameters_of_a_removed_module_are_not_sampled(registry):
    """A parameter that removes a module hides later parameters concerning it or its children."""
    import optuna

    from autocomp.method import ChoiceParam, FloatParam, Method
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
def test_shipped_spaces_load_and_give_parameters(tmp_path, registry, space_name, arch, torch_threads):
    """Every shipped space validates and yields parameters for a CNN and a transformer of the zoo."""
    import torch

    from autocomp import zoo
    from autocomp.export import export_onnx
    from autocomp.method import BaseModelInfo

    torch.manual_seed(0)
    model = zoo.build(arch, **zoo.tiny_kwargs(arch)).eval()
    x = zoo.example_input(arch, tiny=True)
    onnx_path = export_onnx(model, x, tmp_path / "m.onnx")
    space = load_space(default_space_path().with_name(f"{space_name}.toml"), registry.methods)
    concrete = space.concrete(BaseModelInfo(model, x, onnx_path, registry.target("jetson")))
    counts = {m.name: len(p) for m, _, p in concrete.entries}
    assert counts["prune"] > 0 and counts["quantize"] > 0
    if "remove_blocks" in counts:
        assert counts["remove_blocks"] > 0


def test_benchmark_hypervolume_against_hand_computed_areas():
    """The 2-D hypervolume used by benchmarks/joint_vs_single.py, on cases worked out by hand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "joint_vs_single.py"
    spec = importlib.util.spec_from_file_location("joint_vs_single", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hv = module.hypervolume
    # one point: (acc 0.9, 2 ms) against ref (0.8, 10 ms) -> (10 - 2) * (0.9 - 0.8) = 0.8
    assert hv([(0.9, 2.0)], 0.8, 10.0) == pytest.approx(0.8)
    # two points: (0.95, 5) and (0.85, 1): [1,5) at 0.05 + [5,10) at 0.15 = 0.2 + 0.75
    assert hv([(0.95, 5.0), (0.85, 1.0)], 0.8, 10.0) == pytest.approx(0.95)
    # a dominated point adds nothing; points beyond the reference add nothing
    assert hv([(0.95, 5.0), (0.85, 1.0), (0.84, 6.0), (0.7, 0.5), (0.99, 12.0)], 0.8, 10.0) == pytest.approx(0.95)
