"""Target ``cpu``: this host, measured with ONNX Runtime (fixed threads, warm-up, p50/p90)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.errors import TargetError
from autocomp.hookspecs import hookimpl
from autocomp.target import LatencyStats, Target

__all__ = ["CpuTarget"]


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

    def facts(self) -> dict[str, Any]:
        from autocomp.ort import host_facts

        return host_facts(self.policy.threads)


@hookimpl
def register_targets(register):
    register(CpuTarget())
