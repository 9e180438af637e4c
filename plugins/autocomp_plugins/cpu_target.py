"""Target ``cpu``: this host, measured with ONNX Runtime (fixed threads, warm-up; fastest run, p50, p90).

Every final artifact is measured. Before training, :meth:`CpuTarget.predict_latency` estimates a
candidate's latency from its graph (:mod:`autocomp_plugins.cpu_predictor`, calibrated on
measurements of this host) so the search can drop one that cannot meet ``--max-latency``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.errors import TargetError
from autocomp.hookspecs import hookimpl
from autocomp.target import LatencyStats, Target

__all__ = ["CpuTarget"]

logger = logging.getLogger("autocomp")


class CpuTarget(Target):
    name = "cpu"
    aliases = ("local",)
    measured = True
    precisions = frozenset({"fp32", "int8"})
    description = "this host's CPU, measured with ONNX Runtime (1 thread unless --threads)"

    def __init__(self, policy=None):
        self._policy = policy

    @property
    def policy(self):
        from autocomp.ort import TimingPolicy

        return self._policy or TimingPolicy()

    def configure(self, options: Mapping[str, Any]) -> "CpuTarget":
        unknown = sorted(set(options) - {"threads", "min_s", "min_runs"})
        if unknown:
            raise TargetError(f"target 'cpu' does not take option(s) {unknown}; it takes threads, min_s, min_runs")
        try:
            return CpuTarget(replace(self.policy, **{k: v for k, v in options.items() if v is not None}))
        except ValueError as exc:
            raise TargetError(f"target 'cpu': {exc}") from exc

    def latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> LatencyStats:
        from autocomp.ort import measure_latency

        return measure_latency(onnx_path, input_shapes, self.policy, target=self.name)

    def predict_latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> float | None:
        """An *estimate* of the latency in ms (the fastest timed run, the search's default statistic),
        from the graph alone.

        Linear in per-operator work (MACs, elements moved, kernels) with coefficients fitted on
        measurements of this host at this target's thread count (see
        :mod:`autocomp_plugins.cpu_predictor` and ``benchmarks/cpu_predictor.md`` for how close it
        comes). On a host without its own calibration it uses the shipped one and logs a warning.
        Returns None when no calibration is available. Raises
        :class:`autocomp.errors.CandidateError` when the graph cannot be analysed.
        """
        from autocomp_plugins.cpu_predictor import predict_latency_ms

        if self._calibration is None:
            return None
        return predict_latency_ms(onnx_path, input_shapes, self._calibration)

    @functools.cached_property
    def _calibration(self):
        """This host's predictor calibration at this target's thread count, loaded on the first
        prediction; None (after one warning) when there is none."""
        from autocomp_plugins.cpu_predictor import load_calibration

        try:
            return load_calibration(self.policy.threads)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("cpu target: no latency predictor (%s); candidates are only measured", exc)
            return None

    @property
    def validation(self) -> str:
        """For ``autocomp targets``: every artifact is measured; how close the latency predictor used
        before training came in its calibration's cross-validation, and on which host it was fitted."""
        from autocomp_plugins.cpu_predictor import host_feature_facts, host_identity

        calibration = self._calibration
        if calibration is None:
            return "measured; no latency predictor"
        share = calibration.fit.get("cross_validated_within_10pct")
        figure = "not validated" if share is None else f"{100 * share:.0f} % within 10 % (cross-validated)"
        where = ("this host" if calibration.matches(host_identity(), host_feature_facts())
                 else f"another host ({calibration.host.get('cpu_model')}, {calibration.host.get('isa')})")
        return f"measured; predictor before training: {figure}, calibrated on {where}"

    def facts(self) -> dict[str, Any]:
        from autocomp.ort import host_facts

        return host_facts(self.policy.threads)


@hookimpl
def register_targets(register):
    register(CpuTarget())
