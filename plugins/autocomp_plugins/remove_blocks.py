"""Method ``remove_blocks``: drop whole residual blocks, one yes/no flag per removable block.

Which blocks can go (:func:`removable_blocks`). A module is a removable block when, on the
example input,

1. it is called exactly once, with one positional tensor and no keyword arguments, and returns
   one tensor of the same shape and dtype (so ``nn.Identity`` can stand in for it), and
2. either it says so itself, ``module.is_shape_preserving()`` returning True (every residual
   block of :mod:`autocomp.zoo` has this method), or, for models from elsewhere, it is the direct
   child of an ``nn.Sequential`` or ``nn.ModuleList``, is neither a container nor one of torch's
   own layers, and its ``torch.fx`` trace adds the block's own input to something (``x + f(x)``,
   directly or through an ``nn.Identity`` shortcut: a residual connection; a block that fx cannot
   trace is not removable), and
3. the model still runs, with an output of the same shape, when the block's output is replaced
   by its input.

This is deliberately conservative: a shape-preserving block without a skip connection (a plain
conv-BN-ReLU) carries the only path through the network, so removing it is a different, much
more damaging change; such blocks are never proposed. Whole stages are not proposed either:
removing a stage is the same as removing all of its blocks, which the per-block flags cover.

Removal replaces the block by ``nn.Identity()`` where it sits (also inside an ``nn.ModuleList``,
rather than deleting the entry) so that every other module keeps its path: the parameters of
later methods (pruning ratios, ranks) are keyed by the base model's module paths, and renumbering
a ModuleList would hand them to the wrong layers.

``max_removed`` caps how many blocks one candidate loses. When a trial samples more, the ones
removed are those whose removal alone changes the base model's output least (relative L2 change
of the outputs on the first 128 training examples; ties go to the earlier block). This
sensitivity is computed once per base model and block, and cached. ``ctx.notes`` records
``removed_blocks`` and, when the cap applied, ``blocks_kept_by_cap`` and ``block_sensitivity``.
A block kept by the cap keeps its original layers: the search space had already dropped the
pruning ratios and ranks of every block the trial sampled for removal.
"""

from __future__ import annotations

import logging
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from autocomp.errors import SpaceError
from autocomp.hookspecs import hookimpl
from autocomp.method import BaseModelInfo, CandidateContext, ChoiceParam, Method

__all__ = [
    "RemoveBlocksConfig",
    "RemoveBlocksMethod",
    "removable_blocks",
    "remove_blocks",
    "block_sensitivity",
]

logger = logging.getLogger("autocomp")

#: Training examples the sensitivity of a block is measured on.
SENSITIVITY_EXAMPLES = 128


@dataclass(frozen=True)
class RemoveBlocksConfig:
    """``[remove_blocks]`` table.

    ``max_removed``: at most this many blocks are removed from one candidate (None: no cap).
    ``blocks``: only these blocks (or the blocks under these modules) are candidates; empty: all.
    """

    max_removed: int | None = None
    blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_removed is not None and (
            not isinstance(self.max_removed, int) or isinstance(self.max_removed, bool) or self.max_removed < 0
        ):
            raise ValueError(f"max_removed must be a whole number >= 0, got {self.max_removed!r}")
        blocks = self.blocks
        if isinstance(blocks, str) or not isinstance(blocks, (list, tuple)) or not all(
            isinstance(b, str) and b for b in blocks
        ):
            raise ValueError(f"blocks must be a list of module paths such as [\"layer1.1\"], got {blocks!r}")
        object.__setattr__(self, "blocks", tuple(blocks))


def _is_container(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _adds_its_input(module) -> bool:
    """True when the fx trace of ``module`` adds the module's input to something (a residual)."""
    import torch
    import torch.fx as fx
    import torch.nn as nn

    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # data-dependent control flow and the like: be conservative
        return False
    submodules = dict(module.named_modules())
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False

    def is_input(node) -> bool:
        # an nn.Identity shortcut (leaf module) passes the input through unchanged
        while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
            submodules.get(node.target), nn.Identity
        ):
            node = node.args[0]
        return node is inputs[0]

    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if is_add and any(is_input(a) for a in node.args[:2]):
            return True
    return False


def _declares_removable(module) -> bool:
    check = getattr(module, "is_shape_preserving", None)
    if not callable(check):
        return False
    try:
        return bool(check())
    except Exception:
        return False


def removable_blocks(model, example_input) -> list[str]:
    """Paths of the blocks of ``model`` that can be removed, in module order (see the module doc).

    ``model`` is left as it was (hooks are added for one forward pass per block, then removed).
    """
    was_training = model.training
    model.eval()
    try:
        return _removable_blocks(model, example_input)
    finally:
        model.train(was_training)


def _removable_blocks(model, example_input) -> list[str]:
    import torch
    import torch.nn as nn

    parents: dict[str, Any] = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            parents[f"{parent_name}.{child_name}" if parent_name else child_name] = parent
    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or _is_container(module):
            continue
        if _declares_removable(module):
            candidates[name] = module
        elif (isinstance(parents.get(name), (nn.Sequential, nn.ModuleList))
              and not type(module).__module__.startswith("torch.")):
            # torch's own layers are never residual blocks we can export (nn.TransformerEncoderLayer
            # runs a fused kernel in eval mode that the ONNX exporter rejects)
            candidates[name] = module

    # What each candidate is called with, and returns, on the example input (one forward pass).
    calls: dict[str, list[bool]] = {name: [] for name in candidates}

    def recorder(name):
        def hook(module, args, kwargs, output):
            ok = (len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                  and isinstance(output, torch.Tensor) and output.shape == args[0].shape
                  and output.dtype == args[0].dtype)
            calls[name].append(ok)
        return hook

    handles = [m.register_forward_hook(recorder(n), with_kwargs=True) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            reference = model(example_input)
    finally:
        for h in handles:
            h.remove()
    found = [n for n, m in candidates.items()
             if calls[n] == [True] and (_declares_removable(m) or _adds_its_input(m))]
    return [n for n in found if _runs_without(model, candidates[n], example_input, reference)]


def _bypass(module, args, output):
    return args[0]


def _runs_without(model, block, example_input, reference) -> bool:
    """True when ``model`` runs, with an output shaped like ``reference``, with ``block`` bypassed."""
    import torch

    handle = block.register_forward_hook(_bypass)
    try:
        with torch.no_grad():
            out = model(example_input)
    except Exception:
        return False
    finally:
        handle.remove()
    return isinstance(out, torch.Tensor) and out.shape == reference.shape


def block_sensitivity(model, blocks: Sequence[str], inputs, batch_size: int = 64) -> dict[str, float]:
    """Relative change of ``model``'s output on ``inputs`` when each block alone is bypassed:
    ``||f_without_block(x) - f(x)|| / ||f(x)||`` (L2 over every output). Leaves ``model`` as it was."""
    import torch

    was_training = model.training
    model.eval()

    def outputs():
        with torch.no_grad():
            return torch.cat([model(inputs[i : i + batch_size]).double() for i in range(0, len(inputs), batch_size)])

    result: dict[str, float] = {}
    try:
        reference = outputs()
        scale = float(reference.norm()) or 1.0
        for name in blocks:
            handle = model.get_submodule(name).register_forward_hook(_bypass)
            try:
                result[name] = float((outputs() - reference).norm()) / scale
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return result


# base model -> {(id of the inputs, block path): sensitivity}; entries go with the model.
_sensitivity_cache: "weakref.WeakKeyDictionary[Any, dict[tuple[int, str], float]]" = weakref.WeakKeyDictionary()


def _cached_sensitivity(base_model, blocks: Sequence[str], inputs) -> dict[str, float]:
    import copy

    cache = _sensitivity_cache.setdefault(base_model, {})
    missing = [b for b in blocks if (id(inputs), b) not in cache]
    if missing:
        # a private copy: hooks on the shared base model could disturb another user of it
        measured = block_sensitivity(copy.deepcopy(base_model), missing, inputs[:SENSITIVITY_EXAMPLES])
        cache.update({(id(inputs), b): s for b, s in measured.items()})
    return {b: cache[(id(inputs), b)] for b in blocks}


def remove_blocks(model, paths: Sequence[str], example_input=None, skip=None) -> list[str]:
    """Replace each block in ``paths`` by ``nn.Identity()`` in ``model`` (in place); returns the
    paths removed. A block that is missing, no longer shape-preserving, or (with ``example_input``)
    whose removal would leave a model that does not run is left alone and reported to
    ``skip(path, why)``."""
    import torch
    import torch.nn as nn

    removed: list[str] = []
    reference = None
    if example_input is not None:
        with torch.no_grad():
            reference = model.eval()(example_input)
    for path in paths:
        if any(path.startswith(r + ".") for r in removed):
            continue  # went with its parent
        try:
            block = model.get_submodule(path)
        except AttributeError:
            if skip:
                skip(path, "block not present in this candidate")
            continue
        if isinstance(block, nn.Identity):
            continue
        if hasattr(block, "is_shape_preserving") and not _declares_removable(block):
            if skip:
                skip(path, "block no longer maps its input to the same shape")
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, nn.Identity())
        if reference is not None:
            try:
                with torch.no_grad():
                    ok = model(example_input).shape == reference.shape
            except Exception as exc:
                ok, why = False, f"the model does not run without it ({type(exc).__name__}: {exc})"
            else:
                why = "the model's output changes shape without it"
            if not ok:
                setattr(parent, child, block)
                if skip:
                    skip(path, why)
                continue
        removed.append(path)
    return removed


class RemoveBlocksMethod(Method):
    name = "remove_blocks"
    stage = "structural"
    order = 0  # before pruning and factorization, which then see the smaller model
    config_type = RemoveBlocksConfig
    description = "removal of whole residual blocks, one flag per removable block (capped by max_removed)"
    in_anchors = False  # removing as many blocks as the cap allows is rarely a good first guess

    def parameters(self, config: RemoveBlocksConfig, base: BaseModelInfo) -> Sequence[ChoiceParam]:
        if config.max_removed == 0:
            return []
        found = removable_blocks(base.model, base.example_input)
        if config.blocks:
            for entry in config.blocks:
                if not any(b == entry or b.startswith(entry + ".") for b in found):
                    raise SpaceError(
                        f"blocks: {entry!r} is not a removable block of this model, nor a module holding one; "
                        f"removable blocks: {', '.join(found) or 'none'}",
                        key="remove_blocks.blocks",
                    )
            found = [b for b in found if any(b == e or b.startswith(e + ".") for e in config.blocks)]
        # choices are ordered least compressed first: keep the block, then remove it
        return [ChoiceParam(b, (False, True), removes=b, module=b, neutral=False) for b in found]

    def changes_nothing(self, setting: Mapping[str, Any], config: RemoveBlocksConfig) -> bool:
        """No block removed."""
        return not any(remove is True for remove in setting.values())

    def apply(self, model, setting: Mapping[str, Any], config: RemoveBlocksConfig, ctx: CandidateContext):
        chosen = [path for path, remove in setting.items() if remove is True]
        chosen = [p for p in chosen if not any(p.startswith(q + ".") for q in chosen)]
        if config.max_removed is not None and len(chosen) > config.max_removed:
            try:
                sensitivity = _cached_sensitivity(ctx.teacher, chosen, ctx.workload.train.inputs)
            except Exception as exc:  # keep the earliest ones rather than fail the candidate
                logger.warning("remove_blocks: block sensitivity could not be measured: %s", exc)
                sensitivity = {p: 0.0 for p in chosen}
            order = {p: i for i, p in enumerate(chosen)}
            ranked = sorted(chosen, key=lambda p: (sensitivity[p], order[p]))
            kept = ranked[config.max_removed :]
            ctx.notes["block_sensitivity"] = sensitivity
            ctx.notes["blocks_kept_by_cap"] = kept
            chosen = [p for p in chosen if p not in kept]
        removed = remove_blocks(model, chosen, ctx.workload.example_input,
                                skip=lambda what, why: ctx.skip(self.name, what, why))
        ctx.notes["removed_blocks"] = removed
        return model


@hookimpl
def register_methods(register):
    register(RemoveBlocksMethod())
