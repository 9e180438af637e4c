"""Calibration of the edge devices' free parameters on published (or measured) latencies.

Each device has two free parameters (see :mod:`autocomp_plugins.edge.devices` for the priors):

- ``compute_scale``, the fraction of peak a dense convolution reaches: fitted on every device with at
  least one row;
- ``overhead_us``, the per-node overhead: fitted only on devices with at least
  :data:`MIN_ROWS_FOR_OVERHEAD` rows, inside ``[prior / 4, prior * 4]``; otherwise the prior.

The fit minimises the squared error of log latency. A device without rows takes the geometric mean of
the fitted scales of its family (all fitted devices if its family has none) and its overhead prior,
which is also how leave-one-out validation predicts a device's only row.

:func:`correct_from_measurements` refits one device's ``compute_scale`` on a few latencies measured
on the real device and reports the error before and after.

Importing this module is cheap; onnx is imported only when ONNX files are analysed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from autocomp_plugins.edge.costmodel import GraphSummary, analyze, breakdown
from autocomp_plugins.edge.devices import DEVICES, DeviceSpec, get_device

if TYPE_CHECKING:
    import onnx

__all__ = [
    "PUBLISHED_GRAPHS",
    "MIN_ROWS_FOR_OVERHEAD",
    "Observation",
    "PublishedRow",
    "Correction",
    "load_published",
    "observations_for",
    "predict_observation",
    "fit_device",
    "calibrate",
    "leave_one_out",
    "correct_from_measurements",
]

#: The published rows and the per-node work of their graphs, written by benchmarks/edge_validation.py.
PUBLISHED_GRAPHS = Path(__file__).with_name("published_graphs.json")

#: A device needs this many rows before its per-node overhead is fitted rather than taken as prior.
MIN_ROWS_FOR_OVERHEAD = 3

_OVERHEAD_RANGE = 4.0  # the fitted overhead stays within prior / 4 .. prior * 4
_SCALE_RANGE = (1e-3, 10.0)


@dataclass(frozen=True)
class Observation:
    """A graph's work with the latency observed for it; ``precision`` overrides the graph's own."""

    summary: GraphSummary
    latency_ms: float
    precision: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise ValueError(f"an observed latency must be a positive number of ms, got {self.latency_ms!r}")


@dataclass(frozen=True)
class PublishedRow:
    """One row of the published-latency table, with the key of its graph summary."""

    device: str
    model: str
    input_shape: tuple[int, ...]
    precision: str
    latency_ms: float
    statistic: str
    runtime: str
    source: str
    graph: str

    @property
    def precision_override(self) -> str | None:
        """int8 comes from the quantized graph itself; fp32/fp16 rows price the fp32 graph at their precision."""
        return None if self.precision == "int8" else self.precision


@dataclass(frozen=True)
class Correction:
    """What :func:`correct_from_measurements` changed, and how much it helped."""

    device: DeviceSpec
    scale_factor: float
    measured_ms: tuple[float, ...]
    predicted_before_ms: tuple[float, ...]
    predicted_after_ms: tuple[float, ...]

    @property
    def mean_abs_error_before_pct(self) -> float:
        return _mean_abs_error_pct(self.predicted_before_ms, self.measured_ms)

    @property
    def mean_abs_error_after_pct(self) -> float:
        return _mean_abs_error_pct(self.predicted_after_ms, self.measured_ms)


def _mean_abs_error_pct(predicted: Sequence[float], measured: Sequence[float]) -> float:
    return 100.0 * sum(abs(p / m - 1.0) for p, m in zip(predicted, measured)) / len(measured)


# --- published rows -------------------------------------------------------------------------


def load_published(path: Path = PUBLISHED_GRAPHS) -> tuple[list[PublishedRow], dict[str, GraphSummary]]:
    """The published rows and their graph summaries, as stored in ``published_graphs.json``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = [PublishedRow(**{**r, "input_shape": tuple(r["input_shape"])}) for r in data["rows"]]
    graphs = {key: GraphSummary.from_dict(value) for key, value in data["graphs"].items()}
    return rows, graphs


def observations_for(rows: Iterable[PublishedRow], graphs: Mapping[str, GraphSummary]) -> list[Observation]:
    return [Observation(graphs[r.graph], r.latency_ms, r.precision_override) for r in rows]


# --- fitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Terms:
    """An observation reduced to what the fit varies: per-node compute (at scale 1) and memory time."""

    compute_ms: tuple[float, ...]
    memory_ms: tuple[float, ...]
    latency_ms: float

    def predict(self, scale: float, overhead_us: float) -> float:
        return (sum(max(c / scale, m) for c, m in zip(self.compute_ms, self.memory_ms))
                + len(self.compute_ms) * overhead_us * 1e-3)


def _terms(spec: DeviceSpec, observation: Observation) -> _Terms:
    unit = spec.with_calibration(1.0, 0.0)
    costs = breakdown(observation.summary, unit, observation.precision)
    return _Terms(tuple(c.compute_ms for c in costs), tuple(c.memory_ms for c in costs), observation.latency_ms)


def _loss(terms: Sequence[_Terms], scale: float, overhead_us: float) -> float:
    return sum(math.log(t.predict(scale, overhead_us) / t.latency_ms) ** 2 for t in terms)


def _argmin(f: Any, low: float, high: float, grid: int = 60, iterations: int = 30) -> float:
    """Minimise ``f`` over ``[low, high]`` (log-spaced grid, then golden-section on the best bracket)."""
    lo, hi = math.log(low), math.log(high)
    xs = [lo + (hi - lo) * i / grid for i in range(grid + 1)]
    values = [f(math.exp(x)) for x in xs]
    best = min(range(len(xs)), key=values.__getitem__)
    a, b = xs[max(best - 1, 0)], xs[min(best + 1, grid)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(math.exp(d))
    x = (a + b) / 2
    return math.exp(x) if f(math.exp(x)) <= values[best] else math.exp(xs[best])


def fit_device(spec: DeviceSpec, observations: Sequence[Observation], overhead: str = "auto") -> DeviceSpec:
    """``spec`` with ``compute_scale`` (and maybe ``overhead_us``) fitted to ``observations``.

    ``overhead`` says what happens to the per-node overhead: ``"fit"`` fits it within a factor four
    of the prior, ``"prior"`` uses the prior, ``"keep"`` keeps ``spec.overhead_us``, and ``"auto"``
    (the default) fits it when there are at least :data:`MIN_ROWS_FOR_OVERHEAD` observations and
    uses the prior otherwise. Raises ``ValueError`` when there is nothing to fit.
    """
    if not observations:
        raise ValueError(f"no observations to calibrate {spec.name!r} on")
    if overhead not in ("auto", "fit", "prior", "keep"):
        raise ValueError(f"overhead must be 'auto', 'fit', 'prior' or 'keep', got {overhead!r}")
    if overhead == "auto":
        overhead = "fit" if len(observations) >= MIN_ROWS_FOR_OVERHEAD else "prior"
    terms = [_terms(spec, o) for o in observations]
    prior = spec.overhead_prior_us

    def best_scale(overhead_us: float) -> float:
        return _argmin(lambda s: _loss(terms, s, overhead_us), *_SCALE_RANGE)

    if overhead == "fit":
        overhead_us = _argmin(lambda o: _loss(terms, best_scale(o), o), prior / _OVERHEAD_RANGE,
                              prior * _OVERHEAD_RANGE, grid=20, iterations=25)
    else:
        overhead_us = prior if overhead == "prior" else spec.overhead_us
    return spec.with_calibration(best_scale(overhead_us), overhead_us)


def calibrate(rows: Sequence[PublishedRow], graphs: Mapping[str, GraphSummary],
              devices: Mapping[str, DeviceSpec] = DEVICES) -> dict[str, DeviceSpec]:
    """Every device of ``devices`` calibrated on ``rows``; devices without rows borrow their family's scale."""
    fitted: dict[str, DeviceSpec] = {}
    for name, spec in devices.items():
        mine = [r for r in rows if r.device == name]
        if mine:
            fitted[name] = fit_device(spec, observations_for(mine, graphs))
    result = dict(fitted)
    for name, spec in devices.items():
        if name in fitted:
            continue
        family = [s for s in fitted.values() if s.family == spec.family] or list(fitted.values())
        if family:
            scale = math.exp(sum(math.log(s.compute_scale) for s in family) / len(family))
        else:
            scale = spec.compute_scale
        result[name] = spec.with_calibration(scale, spec.overhead_prior_us)
    return result


def leave_one_out(rows: Sequence[PublishedRow], graphs: Mapping[str, GraphSummary],
                  devices: Mapping[str, DeviceSpec] = DEVICES) -> list[float]:
    """For each row, its predicted latency (ms) by a calibration that never saw it."""
    predictions = []
    for i, row in enumerate(rows):
        others = [r for j, r in enumerate(rows) if j != i]
        spec = calibrate(others, graphs, devices)[row.device]
        observation = Observation(graphs[row.graph], row.latency_ms, row.precision_override)
        predictions.append(predict_observation(spec, observation))
    return predictions


def predict_observation(spec: DeviceSpec, observation: Observation) -> float:
    """Predicted latency (ms) of an observation's graph on ``spec``, at the observation's precision."""
    return sum(c.total_ms for c in breakdown(observation.summary, spec, observation.precision))


# --- correction from a real device ----------------------------------------------------------


def correct_from_measurements(
    device: DeviceSpec | str,
    pairs: Iterable[tuple[Any, float] | tuple[Any, Mapping[str, Sequence[int]], float]],
) -> Correction:
    """Refit ``device``'s ``compute_scale`` on latencies measured on the real device.

    Each pair is ``(model, measured_ms)`` or ``(model, input_shapes, measured_ms)``, where ``model`` is
    an ONNX path, a loaded ``onnx.ModelProto`` or a :class:`GraphSummary`; without ``input_shapes``
    the model's inputs must have static shapes. The overhead stays as calibrated: a handful of pairs
    identifies one scale, not two parameters. Returns the corrected device with the predictions and
    errors before and after. Raises ``ValueError`` for an empty or malformed ``pairs`` and
    :class:`autocomp.errors.CandidateError` for a model that cannot be analysed.
    """
    spec = get_device(device) if isinstance(device, str) else device
    observations = []
    for pair in pairs:
        if len(pair) == 2:
            model, measured = pair
            shapes: Mapping[str, Sequence[int]] = {}
        elif len(pair) == 3:
            model, shapes, measured = pair
        else:
            raise ValueError(f"each pair must be (model, ms) or (model, input_shapes, ms), got {pair!r}")
        summary = model if isinstance(model, GraphSummary) else analyze(model, shapes)
        observations.append(Observation(summary, float(measured)))
    if not observations:
        raise ValueError("correct_from_measurements needs at least one (model, measured_ms) pair")
    corrected = fit_device(spec, observations, overhead="keep")
    return Correction(
        device=corrected,
        scale_factor=corrected.compute_scale / spec.compute_scale,
        measured_ms=tuple(o.latency_ms for o in observations),
        predicted_before_ms=tuple(predict_observation(spec, o) for o in observations),
        predicted_after_ms=tuple(predict_observation(corrected, o) for o in observations),
    )
