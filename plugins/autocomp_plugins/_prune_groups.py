"""The prune method's first two steps: a model's prunable groups, and the importance of their units.

Private to :mod:`autocomp_plugins.prune`, whose docstring says what a group is and which
importance criteria exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from autocomp.errors import CandidateError


@dataclass(frozen=True)
class Group:
    name: str
    root: Any  # the layer whose output channels define the group
    prune_fn: Any  # torch-pruning's function for the root's output channels
    channels: int  # output channels of the root
    attention: Any = None  # the attention module whose fused qkv is the root
    consumer: Any = None  # the layer reading the heads (attention only)
    unsupported: str | None = None  # why this group is never pruned

    def current_channels(self) -> int:
        return int(self.root.out_channels if hasattr(self.root, "out_channels") else self.root.out_features)

    def units(self) -> int:
        """What a ratio counts, now: the root's channels, or head dimensions for attention."""
        return int(self.attention.head_dim) if self.attention is not None else self.current_channels()


class UntraceableModel(CandidateError):
    """torch-pruning cannot trace the model at all."""


def _ignored_layers(model) -> list:
    """Layers whose outputs are the model's outputs: the last Linear / conv is never pruned."""
    import torch.nn as nn

    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    return [last] if last is not None else []


def dependency_graph(model, example_input):
    import warnings

    import torch_pruning as tp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notices about unwrapped parameters (a ViT's pos_embed)
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as exc:
        raise UntraceableModel(f"torch-pruning cannot trace the model: {type(exc).__name__}: {exc}") from exc


def _attention_by_qkv(model) -> dict:
    import torch.nn as nn

    found = {}
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if (isinstance(qkv, nn.Linear) and isinstance(getattr(module, "num_heads", None), int)
                and isinstance(getattr(module, "head_dim", None), int)):
            found[qkv] = module
    return found


def _is_depthwise(module) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def find_groups(model, dg) -> list[Group]:
    import torch.nn as nn
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    attention_of = _attention_by_qkv(model)
    groups = []
    for group in dg.get_all_groups(ignored_layers=_ignored_layers(model), root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        if root not in names:
            continue
        if _is_depthwise(root):
            # torch-pruning may start a group at a depthwise conv; it follows the layer feeding it
            producers = [dep.target.module for dep, _ in group
                         if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and not _is_depthwise(dep.target.module)
                         and dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names]
            if not producers:
                continue
            root = producers[0]
        name = names[root]
        if isinstance(root, nn.Conv2d):
            unsupported = (f"grouped convolution (groups={root.groups}); only whole-group pruning would keep "
                           "it valid" if root.groups > 1 else None)
            groups.append(Group(name, root, tp.prune_conv_out_channels, root.out_channels, unsupported=unsupported))
            continue
        attention = attention_of.get(root)
        if attention is None:
            groups.append(Group(name, root, tp.prune_linear_out_channels, root.out_features))
            continue
        heads, head_dim = attention.num_heads, attention.head_dim
        readers = [dep.target.module for dep, _ in group
                   if isinstance(dep.target.module, nn.Linear) and dep.target.module is not root
                   and dg.is_in_channel_pruning_fn(dep.handler)]
        consumer = readers[-1] if readers else None
        if consumer is None or consumer.in_features != heads * head_dim or root.out_features != 3 * heads * head_dim:
            groups.append(Group(name, root, tp.prune_linear_out_channels, root.out_features,
                                 unsupported="attention layout torch-pruning cannot map to heads "
                                             f"(num_heads={heads}, head_dim={head_dim})"))
        else:
            groups.append(Group(name, root, tp.prune_linear_out_channels, root.out_features,
                                 attention=attention, consumer=consumer))
    return groups


def prunable_groups(model, example_input) -> dict[str, int]:
    """Prunable groups of ``model``: name of the group's root layer -> its channel count.

    Groups known to be unprunable (grouped convolutions, unmappable attention) are left out.
    Raises :class:`CandidateError` when torch-pruning cannot trace the model.
    """
    return {g.name: g.channels for g in find_groups(model, dependency_graph(model, example_input))
            if g.unsupported is None}


def keep_count(channels: int, ratio: float, round_to: int) -> int:
    keep = channels * (1.0 - ratio)
    if channels <= round_to:
        return channels if ratio < 0.5 else max(1, int(round(keep)))
    return int(min(channels, max(round_to, round_to * round(keep / round_to))))


# --- importance ---------------------------------------------------------------------------------


def _full_group(dg, g: Group):
    """The torch-pruning group over all current units of ``g`` (for attention: the heads' reader)."""
    import torch_pruning as tp

    if g.attention is not None:
        return dg.get_pruning_group(g.consumer, tp.prune_linear_in_channels, idxs=list(range(g.consumer.in_features)))
    return dg.get_pruning_group(g.root, g.prune_fn, idxs=list(range(g.current_channels())))


def _batches(workload, seed: int, count: int) -> list:
    import torch

    train = workload.train
    size = max(1, int(workload.batch_size))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    order = order[: size * count]
    return [(train.inputs[order[i : i + size]], train.targets[order[i : i + size]])
            for i in range(0, len(order), size)]


def _input_activations(model, batches) -> dict:
    """Mean absolute value of each input channel of every conv / Linear over ``batches``."""
    import torch
    import torch.nn as nn

    sums: dict = {}

    def record(module, inputs):
        x = inputs[0].detach().abs()
        if isinstance(module, nn.Linear):
            per_channel = x.reshape(-1, x.shape[-1]).mean(0)
        else:
            per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)
        total, n = sums.get(module, (0.0, 0))
        sums[module] = (total + per_channel, n + 1)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {m: total / n for m, (total, n) in sums.items()}


def _activation_scores(dg, group, stats: dict, size: int):
    """Per root channel: mean over the group's readers of the activation that channel feeds them."""
    import torch
    import torch.nn as nn

    total, count = torch.zeros(size), torch.zeros(size)
    for item in group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        if (not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or layer not in stats
                or not dg.is_in_channel_pruning_fn(dep.handler) or any(r is None for r in item.root_idxs)):
            continue
        values = stats[layer]
        if not idxs or max(idxs) >= len(values):
            continue
        root = torch.as_tensor(item.root_idxs, dtype=torch.long)
        total.scatter_add_(0, root, values[torch.as_tensor(idxs, dtype=torch.long)].float())
        count.scatter_add_(0, root, torch.ones(len(root)))
    if count.sum() == 0:
        return None
    return total / count.clamp(min=1)


def score_groups(model, dg, groups: Sequence[Group], importance: str, *, workload, seed: int,
                  batches: int, fallbacks: list[str]) -> dict[str, Any]:
    """Importance of every current unit of each group (higher is kept), as a float tensor."""
    import torch
    import torch_pruning as tp

    magnitude = {"l1": tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
                 "l2": tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)}
    generator = torch.Generator().manual_seed(seed)
    data = _batches(workload, seed, batches) if importance in ("taylor", "activation") else []
    stats: dict = {}
    if importance == "taylor":
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for x, y in data:
                workload.compute_loss(model(x), y).backward()
        scorer = tp.importance.GroupTaylorImportance(normalizer=None)
    elif importance == "activation":
        stats = _input_activations(model, data)
    scores: dict[str, Any] = {}
    try:
        for g in groups:
            size = g.consumer.in_features if g.attention is not None else g.current_channels()
            score = None
            if importance == "random":
                score = torch.rand(size, generator=generator)
            else:
                group = _full_group(dg, g)
                try:
                    with torch.no_grad():
                        if importance == "activation":
                            score = _activation_scores(dg, group, stats, size)
                        else:
                            score = (scorer if importance == "taylor" else magnitude[importance])(group)
                except Exception:  # a layer without gradients, an index the scorer cannot map
                    score = None
                if score is None or score.numel() != size or not bool(torch.isfinite(score).all()):
                    if importance in magnitude:
                        continue
                    fallbacks.append(g.name)  # unscorable by this criterion: fall back on magnitude
                    with torch.no_grad():
                        score = magnitude["l2"](group)
                    if score is None or score.numel() != size:
                        continue
            score = score.detach().float().flatten()
            if g.attention is not None:  # one score per head dimension, shared by q, k, v of every head
                score = score.view(g.attention.num_heads, -1).mean(0)
            scores[g.name] = score
    finally:
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
    return scores
