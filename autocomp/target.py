"""What a hardware target is: a device whose latency for an ONNX model is measured or predicted."""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

__all__ = ["LatencyStats", "Target", "PRECISIONS", "STATISTICS"]

#: Numeric precisions a target may declare. Methods intersect what they offer with these.
PRECISIONS = ("fp32", "fp16", "int8", "int4")

#: Statistics a search can optimise (``--latency-statistic``): the fastest timed run, the median,
#: the 90th percentile, the mean.
STATISTICS = ("min", "p50", "p90", "mean")


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one target, in milliseconds, batch as given by the input shape.

    ``min_ms`` is the fastest timed run. A prediction may leave it None (its single figure is
    ``p50_ms``); a measurement from an agent older than this field has none either. :meth:`value`
    picks one statistic by name.
    """

    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    measured: bool  # False when a cost model predicted the figure
    target: str
    facts: Mapping[str, Any] = field(default_factory=dict)
    min_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("p50_ms", "p90_ms", "mean_ms", "min_ms"):
            value = getattr(self, name)
            if name == "min_ms" and value is None:
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite, non-negative number, got {value!r}")

    def value(self, statistic: str) -> float:
        """The statistic named ``statistic`` (one of :data:`STATISTICS`), in ms. For a prediction
        without ``min_ms``, ``"min"`` is its single figure; a measurement without it raises
        ``ValueError`` rather than mixing statistics in one search."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown latency statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        if statistic == "min":
            if self.min_ms is not None:
                return self.min_ms
            if self.measured:
                raise ValueError(f"this measurement on {self.target!r} has no fastest run (an agent older than "
                                 "autocomp's min_ms?); update the agent or pass --latency-statistic p50")
            return self.p50_ms
        return getattr(self, f"{statistic}_ms")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["facts"] = dict(self.facts)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyStats":
        facts = dict(data.get("facts", {}))
        # records from before min_ms was a field kept it in the facts
        min_ms = data.get("min_ms", facts.get("min_ms"))
        return cls(**{k: data[k] for k in ("p50_ms", "p90_ms", "mean_ms", "runs", "measured", "target")},
                   facts=facts, min_ms=min_ms)


class Target(abc.ABC):
    """Base class of a device target. Subclass it in a plugin and register an instance.

    Class attributes a subclass sets:

    - ``name``: what ``--target`` takes; ``aliases``: other accepted names.
    - ``measured``: True when :meth:`latency` runs the model on a real device, False when it predicts.
    - ``precisions``: the numeric precisions the device runs (a subset of :data:`PRECISIONS`).
    - ``description``: one line for ``autocomp targets``.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    measured: ClassVar[bool] = True
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    description: ClassVar[str] = ""

    def configure(self, options: Mapping[str, Any]) -> "Target":
        """Return a target set up with user options (``--threads``, ``--agent`` ...).

        The default accepts no options. Raise :class:`autocomp.errors.TargetError` for options the
        target does not understand, naming them.
        """
        if options:
            from autocomp.errors import TargetError

            raise TargetError(
                f"target {self.name!r} takes no options, but got {sorted(options)}; remove them"
            )
        return self

    @abc.abstractmethod
    def latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> LatencyStats:
        """Latency statistics of the ONNX model at ``onnx_path`` fed inputs of ``input_shapes``.

        Raise :class:`autocomp.errors.CandidateError` when this model cannot run on the target
        (the trial fails, the search goes on) and :class:`autocomp.errors.InfrastructureError`
        when the device itself is unreachable.
        """

    def predict_latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> float | None:
        """A cheap prediction of the latency in ms, or None when the target has no predictor.

        The search calls this before any training is spent on a candidate, to drop one that cannot
        meet ``--max-latency``. Predicted targets return their prediction; measured targets may
        return a calibrated estimate (the ``cpu`` target does).
        """
        if not self.measured:
            return self.latency(onnx_path, input_shapes).p50_ms
        return None

    def corrected(self, measurements: Sequence[tuple[Path, Mapping[str, Sequence[int]], float]]) -> tuple["Target", dict[str, Any]]:
        """A predicted target corrected from real measurements ``(onnx_path, input_shapes, ms)``.

        Returns the corrected target and a report with at least ``options`` (the ``configure``
        options that reproduce the correction) and ``error_before_pct`` / ``error_after_pct`` (mean
        absolute error of the predictions on these measurements). Measured targets and predicted
        ones without a correction raise :class:`autocomp.errors.TargetError`.
        """
        from autocomp.errors import TargetError

        raise TargetError(f"target {self.name!r} cannot be calibrated from measurements")

    def facts(self) -> dict[str, Any]:
        """Facts recorded in the run manifest: runtime version, CPU model, thread count ..."""
        return {}
