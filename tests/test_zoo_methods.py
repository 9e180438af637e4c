"""Every structural method, alone and all together, on every architecture of the zoo (tiny versions).

Each candidate is built the way a trial builds it (``build_model``: structural methods in order on a
copy, then batch-norm recalibration), from parameters sampled through an Optuna trial that enqueues
the setting: pruning ratio 0.5 per group, every removable block removed (only the first one when all
methods run together, so pruning and factorization still have blocks to work on), rank ratio 0.5
per layer. The result must cost fewer MACs and parameters, export to
ONNX, run in ONNX Runtime, and agree with torch within atol 1e-4 + rtol 1e-3 * |torch| (the
engine's default tolerance; every case meets it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from autocomp import zoo
from autocomp.candidate import build_model, count_macs, recalibrate_batchnorm
from autocomp.export import check_parity, export_onnx
from autocomp.method import BaseModelInfo, CandidateContext, ChoiceParam, FloatParam
from autocomp.space import parse_space
from autocomp.workload import Split, Workload
from autocomp_plugins.lowrank import LowRankMethod
from autocomp_plugins.prune import PruneMethod
from autocomp_plugins.remove_blocks import RemoveBlocksMethod

NAMES = list(zoo.ARCHITECTURES)
METHODS = {"prune": PruneMethod(), "remove_blocks": RemoveBlocksMethod(), "lowrank": LowRankMethod()}
TABLES = {
    "prune": {"ratio": [0.0, 0.5], "round_to": 1},
    "remove_blocks": {},
    "lowrank": {"rank_ratio": [0.25, 1.0], "min_size": 0, "round_to": 1},
}
#: The value enqueued for every parameter of each kind.
SETTING = {"prune": 0.5, "remove_blocks": True, "lowrank": 0.5}
CASES = [*METHODS, "all"]
ATOL, RTOL = 1e-4, 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's and torch-pruning's notices
        yield
    torch.set_num_threads(threads)


_bases: dict[str, Workload] = {}
_base_counts: dict[str, tuple[int, int]] = {}


def _shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _workload(name: str) -> Workload:
    """A tiny zoo model with batch-norm statistics of its (random) training data, built once."""
    if name not in _bases:
        torch.manual_seed(0)
        model = zoo.build(name, **zoo.tiny_kwargs(name))
        shape = zoo.input_shape(name, batch=32, tiny=True)
        generator = torch.Generator().manual_seed(1)
        train = Split(torch.randn(shape, generator=generator), torch.zeros(32, dtype=torch.long))
        val = Split(torch.randn(shape, generator=generator), torch.zeros(32, dtype=torch.long))
        recalibrate_batchnorm(model, train.inputs, batches=1)
        _bases[name] = Workload(name=f"tiny-{name}", model=model.eval(),
                                example_input=zoo.example_input(name, tiny=True), train=train, val=val)
        _base_counts[name] = count_macs(model, _bases[name].example_input)
    return _bases[name]


def _build(name: str, methods: list[str], tmp_path: Path):
    import optuna

    workload = _workload(name)
    tables = {m: TABLES[m] for m in methods}
    space = parse_space(tables, METHODS, source="test")
    concrete = space.concrete(BaseModelInfo(workload.model, workload.example_input, tmp_path / "unused.onnx", None))
    enqueued = {f"{method.name}.{p.name}": SETTING[method.name]
                for method, _, params in concrete.entries for p in params
                if p.module is not None and isinstance(p, (FloatParam, ChoiceParam))}
    if len(methods) > 1:
        # one block goes, so the other methods still have the rest of the model to work on
        blocks = [k for k in enqueued if k.startswith("remove_blocks.")]  # model order
        enqueued.update(dict.fromkeys(blocks[1:], False))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(enqueued)
    spec = concrete.sample(study.ask())
    ctx = CandidateContext(workload=workload, teacher=workload.model, target=None, work_dir=tmp_path, seed=0)
    return build_model(workload.model, spec, concrete, ctx), spec, ctx


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_structural_methods_on_the_zoo_export_faithfully_and_cost_less(name, case, tmp_path):
    workload = _workload(name)
    methods = list(METHODS) if case == "all" else [case]
    x = workload.example_input
    macs, params = _base_counts[name]
    base_shapes = _shapes(workload.model)
    candidate, spec, ctx = _build(name, methods, tmp_path)

    for method in methods:
        assert spec.settings[method], f"{method} found nothing to do on {name}"
    assert _shapes(workload.model) == base_shapes  # the base model is untouched
    new_macs, new_params = count_macs(candidate, x)
    assert new_macs < macs and new_params < params
    if "remove_blocks" in methods:
        removable = list(spec.settings["remove_blocks"])
        assert ctx.notes["removed_blocks"] == (removable[:1] if case == "all" else removable)
    if "lowrank" in methods:
        assert ctx.notes["lowrank_ranks"]

    inputs = workload.val.inputs[:8]
    with torch.no_grad():
        out = candidate(inputs)
    assert out.shape == workload.model(inputs).shape
    assert torch.isfinite(out).all() and out.abs().max() > 1e-2  # a vacuous parity check is no check
    path = export_onnx(candidate, x, tmp_path / f"{name}-{case}.onnx")
    check_parity(candidate, path, inputs, atol=ATOL, rtol=RTOL)


def test_the_new_methods_register_through_the_plugin_hook():
    import autocomp_plugins.lowrank as lowrank
    import autocomp_plugins.remove_blocks as remove_blocks
    from autocomp.plugins import load_registry

    registry = load_registry(entry_points=[], extra_plugins=[("remove_blocks", remove_blocks), ("lowrank", lowrank)])
    assert {name: (m.stage, m.order) for name, m in registry.methods.items()} == {
        "remove_blocks": ("structural", 0),
        "lowrank": ("structural", 20),
    }
