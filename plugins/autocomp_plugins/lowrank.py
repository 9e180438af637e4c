"""Method ``lowrank``: low-rank factorization by truncated SVD, one rank ratio per layer.

- ``nn.Linear(in, out)``: ``W ~= U_r S_r V_r^T`` becomes ``Linear(in, r, bias=False)`` then
  ``Linear(r, out)`` (the original bias goes on the second factor).
- ``nn.Conv2d(in, out, k x k)`` (``groups == 1``): the weight reshaped to ``(out, in*k*k)`` is
  factorized the same way, giving a ``k x k`` conv to ``r`` channels (same stride, padding,
  dilation) followed by a ``1 x 1`` conv to ``out`` channels. Grouped and depthwise convs are
  left alone: each group is already a small matrix, and their cost is dominated by memory traffic.

The singular values are split evenly (``sqrt(S)`` into each factor) so both factors have weights of
similar scale, which suits later quantization. The layer is replaced by an ``nn.Sequential`` of the
two factors at the same path (``fc`` becomes ``fc.0`` and ``fc.1``), so code that looks the layer up
by name still finds it.

A layer with rows x cols weight matrix (``out`` x ``in*k*k``) at rank ``r`` costs ``r*(rows+cols)``
multiply-adds per output position instead of ``rows*cols``; where that is not smaller, the layer is
left alone and the reason recorded. Ranks are computed from the layer's shape in the candidate
(after pruning), so ``rank_ratio`` keeps its meaning on a pruned layer. The final classifier may be
factorized: its output count does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from autocomp.hookspecs import hookimpl
from autocomp.method import BaseModelInfo, CandidateContext, FloatParam, Method, parse_range

__all__ = [
    "LowRankConfig",
    "LowRankMethod",
    "LAYER_KINDS",
    "rank_for",
    "lowrank_layers",
    "factorize_linear",
    "factorize_conv",
    "factorize_model",
]

LAYER_KINDS = ("linear", "conv", "all")


@dataclass(frozen=True)
class LowRankConfig:
    """``[lowrank]`` table.

    ``rank_ratio``: fraction of a layer's full rank kept, sampled per layer, in (0, 1]; 1.0 leaves
    the layer alone. ``layers``: which layers are factorized (``linear``, ``conv`` or ``all``).
    ``min_size``: layers with fewer weights than this are left alone. ``round_to``: ranks are
    multiples of this (layers of full rank at most ``round_to`` use unrounded ranks).
    """

    rank_ratio: tuple[float, float] = (0.25, 1.0)
    layers: str = "all"
    min_size: int = 1024
    round_to: int = 8

    def __post_init__(self) -> None:
        value = list(self.rank_ratio) if isinstance(self.rank_ratio, tuple) else self.rank_ratio
        lo, hi = parse_range(value, key="rank_ratio", source="", section="lowrank", low=0.0, high=1.0)
        if lo <= 0:
            raise ValueError(f"rank_ratio must lie in (0, 1] (a fraction of the full rank kept), got {value!r}")
        object.__setattr__(self, "rank_ratio", (lo, hi))
        if self.layers not in LAYER_KINDS:
            raise ValueError(f"layers must be one of {', '.join(LAYER_KINDS)}, got {self.layers!r}")
        if not isinstance(self.min_size, int) or isinstance(self.min_size, bool) or self.min_size < 0:
            raise ValueError(f"min_size must be a whole number >= 0 (weights in a layer), got {self.min_size!r}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1:
            raise ValueError(f"round_to must be a whole number >= 1, got {self.round_to!r}")


def rank_for(ratio: float, full_rank: int, round_to: int = 1) -> int:
    """The rank kept for ``ratio`` of ``full_rank``: rounded to a multiple of ``round_to`` (at least
    ``round_to``; at least 1 when the full rank is no larger than ``round_to``), never above full."""
    if ratio >= 1.0:
        return full_rank
    wanted = ratio * full_rank
    if full_rank <= round_to:
        return min(full_rank, max(1, int(round(wanted))))
    return min(full_rank, max(round_to, round_to * int(round(wanted / round_to))))


def _matrix_shape(layer) -> tuple[int, int, str]:
    """(rows, cols, kind) of the weight matrix that is factorized: out x in(*k*k)."""
    import torch.nn as nn

    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, "linear"
    kh, kw = layer.kernel_size
    return layer.out_channels, layer.in_channels * kh * kw, "conv"


def _cost_reason(layer, rank: int) -> str | None:
    """Why factorizing ``layer`` at ``rank`` would not reduce its cost, or None when it would."""
    rows, cols, kind = _matrix_shape(layer)
    if rank * (rows + cols) < rows * cols:
        return None
    if kind == "linear":
        return (f"rank {rank} would not reduce cost: r*(in+out) = {rank * (rows + cols)} >= "
                f"in*out = {rows * cols}")
    return (f"rank {rank} would not reduce cost: r*(in*k*k + out) = {rank * (rows + cols)} >= "
            f"out*in*k*k = {rows * cols} MACs per output position")


def lowrank_layers(model, example_input, layers: str = "all", min_size: int = 0,
                   lowest_ratio: float | None = None, round_to: int = 1) -> tuple[dict[str, int], dict[str, str]]:
    """Layers of ``model`` that ``lowrank`` may factorize, and those it leaves alone.

    Returns ``(eligible, skipped)``: path -> full rank, and path -> why the layer is left alone.
    Considered are ``nn.Linear`` (``layers`` "linear" or "all") and conv layers ("conv" or "all").
    With ``lowest_ratio``, a layer that would not get cheaper even at that ratio is skipped.
    ``example_input`` runs once, to find layers the model never calls as modules (whose weights
    its parent uses directly, as ``nn.MultiheadAttention`` does); replacing those would break it.
    """
    import torch
    import torch.nn as nn

    wanted: tuple[type, ...] = ()
    if layers in ("linear", "all"):
        wanted += (nn.Linear,)
    if layers in ("conv", "all"):
        wanted += (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and isinstance(module, wanted):
            paths.setdefault(id(module), []).append(name)
    modules = dict(model.named_modules())
    called: set[int] = set()
    handles = [modules[names[0]].register_forward_hook(lambda m, a, o: called.add(id(m))) for names in paths.values()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    eligible: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for key, names in paths.items():
        name, layer = names[0], modules[names[0]]
        if len(names) > 1:
            skipped.update({n: f"shared by several paths ({', '.join(names)})" for n in names})
            continue
        if type(layer) not in (nn.Linear, nn.Conv2d):
            # subclasses too: nn.MultiheadAttention's out_proj is a Linear subclass read directly
            skipped[name] = f"{type(layer).__name__} is not factorized (only nn.Linear and nn.Conv2d are)"
            continue
        if key not in called:
            skipped[name] = "never called as a module in forward (its weight is used directly)"
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            what = "depthwise" if layer.groups == layer.in_channels else "grouped"
            skipped[name] = f"{what} conv (groups={layer.groups}) is not factorized"
            continue
        if layer.weight.numel() < min_size:
            skipped[name] = f"{layer.weight.numel()} weights, fewer than min_size={min_size}"
            continue
        rows, cols, _ = _matrix_shape(layer)
        full = min(rows, cols)
        if lowest_ratio is not None:
            reason = _cost_reason(layer, rank_for(lowest_ratio, full, round_to))
            if reason is not None:
                skipped[name] = f"even at rank_ratio {lowest_ratio}, {reason}"
                continue
        eligible[name] = full
    return eligible, skipped


def _split_svd(matrix, rank: int):
    """(left, right) with ``left @ right`` the best rank-``rank`` approximation of ``matrix``."""
    import torch

    u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root).to(matrix.dtype)  # rows x r
    right = (root[:, None] * vh[:rank]).to(matrix.dtype)  # r x cols
    return left, right


def factorize_linear(layer, rank: int):
    """``nn.Sequential(Linear(in, rank, bias=False), Linear(rank, out))`` approximating ``layer``;
    exact (up to rounding) at ``rank = min(in, out)``."""
    import torch
    import torch.nn as nn

    left, right = _split_svd(layer.weight, rank)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(right)
        second.weight.copy_(left)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device).train(layer.training)


def factorize_conv(conv, rank: int):
    """``nn.Sequential(k x k conv to rank channels, 1 x 1 conv to out channels)`` approximating
    ``conv`` (``groups`` must be 1); exact (up to rounding) at ``rank = min(out, in*k*k)``."""
    import torch
    import torch.nn as nn

    if conv.groups != 1:
        raise ValueError(f"only convs with groups=1 can be factorized, got groups={conv.groups}")
    out_channels, in_channels, kh, kw = conv.weight.shape
    left, right = _split_svd(conv.weight.reshape(out_channels, in_channels * kh * kw), rank)
    first = nn.Conv2d(in_channels, rank, (kh, kw), stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
    second = nn.Conv2d(rank, out_channels, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(right.reshape(rank, in_channels, kh, kw))
        second.weight.copy_(left.reshape(out_channels, rank, 1, 1))
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second).to(conv.weight.device).train(conv.training)


def factorize_model(model, example_input, ratios: Mapping[str, float], config: "LowRankConfig",
                    skip=None) -> dict[str, tuple[int, int]]:
    """Factorize ``model`` in place: layer path -> rank ratio. Returns path -> (full rank, rank) for
    the layers factorized. Everything left alone (except layers at ratio 1.0) goes to
    ``skip(path, why)``: layers that are gone, ineligible, or would not get cheaper."""
    import torch.nn as nn

    if config.rank_ratio[0] >= 1.0:
        return {}  # every layer keeps its full rank
    eligible, skipped = lowrank_layers(model, example_input, config.layers, config.min_size,
                                       lowest_ratio=config.rank_ratio[0], round_to=config.round_to)
    modules = dict(model.named_modules())
    done: dict[str, tuple[int, int]] = {}
    for path, ratio in ratios.items():
        if path not in modules:
            if skip:
                skip(path, "layer not present in this candidate (removed earlier)")
            continue
        if path not in eligible:
            if skip:
                skip(path, skipped.get(path, f"{type(modules[path]).__name__} at this path can no longer be factorized"))
            continue
        if ratio >= 1.0:
            continue
        layer, full = modules[path], eligible[path]
        rank = rank_for(float(ratio), full, config.round_to)
        reason = _cost_reason(layer, rank)
        if reason is not None:
            if skip:
                skip(path, reason)
            continue
        factors = factorize_linear(layer, rank) if isinstance(layer, nn.Linear) else factorize_conv(layer, rank)
        parent_path, _, child = path.rpartition(".")
        setattr(modules[parent_path] if parent_path else model, child, factors)
        done[path] = (full, rank)
    # Layers that never had a rank parameter (too small, depthwise ...) are not reported per trial:
    # the space never offered them, `autocomp space show` lists what it does offer.
    return done


class LowRankMethod(Method):
    name = "lowrank"
    stage = "structural"
    order = 20  # after pruning: ranks follow the pruned shapes
    config_type = LowRankConfig
    description = "low-rank factorization (truncated SVD) of Linear and Conv2d layers, one rank ratio per layer"
    in_anchors = False  # factorizing every layer at once is rarely a good first guess

    def parameters(self, config: LowRankConfig, base: BaseModelInfo) -> Sequence[FloatParam]:
        lo, hi = config.rank_ratio
        if math.isclose(lo, 1.0):
            return []
        eligible, _ = lowrank_layers(base.model, base.example_input, config.layers, config.min_size,
                                     lowest_ratio=lo, round_to=config.round_to)
        return [FloatParam(path, lo, hi, module=path, neutral=hi) for path in eligible]

    def changes_nothing(self, setting: Mapping[str, Any], config: LowRankConfig) -> bool:
        """Every layer at full rank (a ratio of 1 factorizes nothing), or no layer to factorize."""
        return all(ratio >= 1.0 for ratio in setting.values())

    def apply(self, model, setting: Mapping[str, Any], config: LowRankConfig, ctx: CandidateContext):
        done = factorize_model(model, ctx.workload.example_input, setting, config,
                               skip=lambda what, why: ctx.skip(self.name, what, why))
        ctx.notes["lowrank_ranks"] = {k: list(v) for k, v in done.items()}
        return model


@hookimpl
def register_methods(register):
    register(LowRankMethod())
