"""Correct a predicted device target from a handful of measurements on the real device.

``autocomp calibrate --target jetson-orin-nano --agent URL`` exports a few reference models from the
zoo, measures them through the device's agent, refits the target's predictor on those measurements,
reports how far off the predictions were before and after, and stores the correction. Later runs of
that target use the stored correction (``run.json`` records it among the target's facts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from autocomp.cache import cache_dir
from autocomp.errors import ConfigError, TargetError
from autocomp.results import write_json
from autocomp.target import Target

__all__ = ["REFERENCE_MODELS", "reference_models", "calibrate_target", "stored_calibration", "calibration_path"]

logger = logging.getLogger("autocomp")

#: (zoo name, builder keyword arguments, input shape) for ``standard`` and ``tiny`` sizes.
REFERENCE_MODELS: dict[str, list[tuple[str, dict[str, Any], tuple[int, ...]]]] = {
    "standard": [
        ("resnet18", {}, (1, 3, 224, 224)),
        ("mobilenet_v2", {}, (1, 3, 224, 224)),
        ("resnet20", {}, (1, 3, 32, 32)),
        ("mobilefacenet", {}, (1, 3, 112, 112)),
    ],
    "tiny": [
        ("resnet20", {"width": 8}, (1, 3, 32, 32)),
        ("resnet18", {"width": 8, "num_classes": 10}, (1, 3, 64, 64)),
        ("mobilenet_v2", {"width_mult": 0.25, "num_classes": 10, "last_channels": 64}, (1, 3, 64, 64)),
    ],
}


def calibration_path(target_name: str) -> Path:
    return cache_dir("calibration", f"{target_name}.json")


def stored_calibration(target_name: str) -> dict[str, Any] | None:
    """The stored correction of ``target_name`` (``options`` and its report), or None."""
    path = calibration_path(target_name)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data.get("options"), dict) else None
    except (OSError, ValueError):
        logger.warning("ignoring unreadable calibration file %s", path)
        return None


def reference_models(out_dir: Path, size: str = "standard") -> list[tuple[Path, dict[str, list[int]]]]:
    """Export the reference models of ``size`` to ``out_dir``; [(onnx path, input shapes)]."""
    import torch

    from autocomp import zoo
    from autocomp.export import export_onnx

    if size not in REFERENCE_MODELS:
        raise ConfigError(f"reference model size must be one of {sorted(REFERENCE_MODELS)}, got {size!r}")
    models = []
    for name, kwargs, shape in REFERENCE_MODELS[size]:
        torch.manual_seed(0)
        model = zoo.build(name, **kwargs).eval()
        path = export_onnx(model, torch.randn(*shape), out_dir / f"{name}.onnx")
        models.append((path, {"input": list(shape)}))
    return models


@dataclass(frozen=True)
class CalibrationResult:
    target: str
    options: Mapping[str, Any]
    report: Mapping[str, Any]
    path: Path


def calibrate_target(target: Target, measuring: Target, work_dir: Path, size: str = "standard",
                     on_model: Callable[[str, float], None] | None = None) -> CalibrationResult:
    """Measure the reference models on ``measuring`` (the real device), correct ``target`` from them,
    store the correction, and return it with the errors before and after."""
    if target.measured:
        raise TargetError(f"target {target.name!r} is measured, not predicted; there is nothing to calibrate")
    if not measuring.measured:
        raise TargetError("calibration needs measurements from a real device: pass --agent URL")
    measurements: list[tuple[Path, Mapping[str, Sequence[int]], float]] = []
    for path, shapes in reference_models(work_dir, size):
        stats = measuring.latency(path, shapes)
        measurements.append((path, shapes, stats.p50_ms))
        if on_model:
            on_model(path.stem, stats.p50_ms)
    _, report = target.corrected(measurements)
    record = {
        "target": target.name,
        "options": report["options"],
        "report": {k: v for k, v in report.items() if k != "options"},
        "models": [p.stem for p, _, _ in measurements],
        "device_facts": measuring.facts(),
        "calibrated": datetime.now(timezone.utc).isoformat(),
    }
    path = calibration_path(target.name)
    write_json(path, record)
    return CalibrationResult(target.name, report["options"], record["report"], path)
