"""Predicted latency targets for edge devices: Jetson Nano, Orin Nano (alias ``jetson``), Orin NX,
AGX Orin, Raspberry Pi 4 and 5.

Nothing runs on the device: :mod:`~autocomp_plugins.edge.costmodel` prices the ONNX graph node by node
(roofline with TensorRT-like fusion) on the device described in :mod:`~autocomp_plugins.edge.devices`,
whose free parameters :mod:`~autocomp_plugins.edge.calibrate` fitted to published measurements
(``benchmarks/edge_validation.md`` shows how well). Predictions are cheap (a fraction of a second
for a ResNet-50), so the search can drop a candidate that cannot meet ``--max-latency`` early.

Precisions each device declares:

- Jetson Nano: fp32, fp16. Its Maxwell GPU (sm_53) has packed half2 arithmetic but neither tensor
  cores nor DP4A, so TensorRT has no int8 kernels for it.
- Orin Nano, Orin NX, AGX Orin: fp32, fp16, int8 (Ampere tensor cores; fp32 runs as TF32).
- Raspberry Pi 4: fp32, int8. The Cortex-A72 (Armv8.0) has no fp16 arithmetic; int8 runs on
  widening 8-bit multiply-accumulates (XNNPACK, ONNX Runtime).
- Raspberry Pi 5: fp32, fp16, int8. The Cortex-A76 (Armv8.2) has fp16 arithmetic and SDOT.

This module is cheap to import: onnx is imported only when a latency is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from autocomp.hookspecs import hookimpl
from autocomp.target import LatencyStats, Target
from autocomp_plugins.edge.devices import DeviceSpec, get_device

__all__ = [
    "EdgeTarget",
    "JetsonNano",
    "JetsonOrinNano",
    "JetsonOrinNX",
    "JetsonAGXOrin",
    "RaspberryPi4",
    "RaspberryPi5",
    "register_targets",
]

#: Per-device leave-one-out errors against the published rows, written by benchmarks/edge_validation.py.
VALIDATION_FILE = Path(__file__).with_name("validation.json")

#: Options :meth:`EdgeTarget.configure` accepts: overrides of the calibrated parameters (for a
#: correction measured on a real device, see ``calibrate.correct_from_measurements``).
_OPTIONS = ("compute_scale", "overhead_us")


class EdgeTarget(Target):
    """A device whose latency the edge cost model predicts. Subclasses name their device::

        class JetsonNano(EdgeTarget, device="jetson-nano"): ...

    (or ``device=DeviceSpec(...)`` for a device of a third party's own), which sets ``name``,
    ``aliases``, ``precisions`` and ``description`` from the device's spec.
    """

    measured = False
    device: ClassVar[DeviceSpec]

    def __init_subclass__(cls, device: str | DeviceSpec | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if device is None:  # an intermediate base class; its subclasses name the device
            return
        spec = get_device(device) if isinstance(device, str) else device
        cls.device = spec
        cls.name = spec.name
        cls.aliases = spec.aliases
        cls.precisions = spec.precisions
        cls.description = spec.description

    def __init__(self, spec: DeviceSpec | None = None) -> None:
        self.spec = spec or type(self).device

    def configure(self, options: Mapping[str, Any]) -> "EdgeTarget":
        """A target with ``compute_scale`` and/or ``overhead_us`` replaced (both positive numbers)."""
        if not options:
            return self
        from autocomp.errors import TargetError

        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TargetError(
                f"target {self.name!r} does not take options {unknown}; it takes {list(_OPTIONS)}"
            )
        values = {}
        for key, value in options.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if not number > 0 or number == float("inf"):
                raise TargetError(f"target option {key} must be a positive number, got {value!r}")
            values[key] = number
        spec = self.spec.with_calibration(values.get("compute_scale", self.spec.compute_scale),
                                          values.get("overhead_us"))
        return type(self)(spec)

    def latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> LatencyStats:
        """Predicted latency of the model; min, p50, p90 and mean are the same single prediction.

        Raises :class:`autocomp.errors.CandidateError` when the model cannot be analysed or uses a
        precision the device does not run (int8 on a Jetson Nano, fp16 on a Raspberry Pi 4).
        """
        from autocomp_plugins.edge.costmodel import analyze, breakdown

        summary = analyze(onnx_path, input_shapes)
        costs = breakdown(summary, self.spec)
        total = sum(c.total_ms for c in costs)
        facts = {
            **self.facts(),
            "precisions_in_graph": sorted(summary.precisions),
            "macs": summary.macs,
            "kernels": len(costs),
            "compute_bound_ms": round(sum(c.total_ms for c in costs if c.bound == "compute"), 4),
            "memory_bound_ms": round(sum(c.total_ms for c in costs if c.bound == "memory"), 4),
            "overhead_ms": round(sum(c.overhead_ms for c in costs), 4),
        }
        return LatencyStats(p50_ms=total, p90_ms=total, mean_ms=total, runs=0, measured=False,
                            target=self.name, facts=facts, min_ms=total)

    @property
    def validation(self) -> str:
        """What the validation against published measurements found for this device, in words."""
        import json

        try:
            devices = json.loads(VALIDATION_FILE.read_text())["devices"]
        except (OSError, ValueError, KeyError):
            return "not validated"
        entry = devices.get(self.spec.name)
        if entry is None:
            return "no published row; family calibration"
        return (f"{entry['published_rows']} published row(s), leave-one-out error "
                f"<= {entry['max_abs_loo_error_pct']:.0f} %")

    def corrected(self, measurements: Sequence[tuple[Path, Mapping[str, Sequence[int]], float]]) -> tuple["EdgeTarget", dict[str, Any]]:
        """Refit this device's compute scale on latencies measured on the real device (through
        ``autocomp agent serve``); the per-node overhead stays as calibrated."""
        from autocomp_plugins.edge.calibrate import correct_from_measurements

        correction = correct_from_measurements(self.spec, [(path, shapes, ms) for path, shapes, ms in measurements])
        report = {
            "options": {"compute_scale": correction.device.compute_scale},
            "scale_factor": correction.scale_factor,
            "measured_ms": list(correction.measured_ms),
            "predicted_before_ms": list(correction.predicted_before_ms),
            "predicted_after_ms": list(correction.predicted_after_ms),
            "error_before_pct": correction.mean_abs_error_before_pct,
            "error_after_pct": correction.mean_abs_error_after_pct,
        }
        return type(self)(correction.device), report

    def facts(self) -> dict[str, Any]:
        return {
            "predictor": "autocomp_plugins.edge roofline cost model",
            "device": self.spec.name,
            "runtime": self.spec.runtime,
            "compute_scale": self.spec.compute_scale,
            "overhead_us": self.spec.overhead_us,
        }


class JetsonNano(EdgeTarget, device="jetson-nano"):
    """NVIDIA Jetson Nano 4 GB (Maxwell GPU, TensorRT)."""


class JetsonOrinNano(EdgeTarget, device="jetson-orin-nano"):
    """NVIDIA Jetson Orin Nano 8 GB in MAXN Super mode (Ampere GPU, TensorRT); also ``jetson``."""


class JetsonOrinNX(EdgeTarget, device="jetson-orin-nx"):
    """NVIDIA Jetson Orin NX 16 GB (Ampere GPU, TensorRT)."""


class JetsonAGXOrin(EdgeTarget, device="jetson-agx-orin"):
    """NVIDIA Jetson AGX Orin 64 GB (Ampere GPU, TensorRT with CUDA graphs)."""


class RaspberryPi4(EdgeTarget, device="raspberry-pi-4"):
    """Raspberry Pi 4 B (4x Cortex-A72)."""


class RaspberryPi5(EdgeTarget, device="raspberry-pi-5"):
    """Raspberry Pi 5 (4x Cortex-A76)."""


@hookimpl
def register_targets(register):
    """Register one predicted target per edge device."""
    for target_class in (JetsonNano, JetsonOrinNano, JetsonOrinNX, JetsonAGXOrin, RaspberryPi4, RaspberryPi5):
        register(target_class())
