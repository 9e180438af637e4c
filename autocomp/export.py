"""Export a torch model to ONNX and check the export agrees with torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autocomp.errors import ExportError

if TYPE_CHECKING:
    import torch

__all__ = ["export_onnx", "check_parity", "OPSET"]

logger = logging.getLogger("autocomp")

OPSET = 17


def export_onnx(model: "torch.nn.Module", example_input: "torch.Tensor", path: Path) -> Path:
    """Export ``model`` (eval mode) to ``path`` with one input ``input`` and a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra packages and keeps
    node names that follow module names (``/layer1/layer1.0/conv1/Conv``).
    Raises :class:`ExportError` naming the cause when torch cannot export the model.
    """
    import torch

    model = model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(
            f"the model cannot be exported to ONNX ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "autocomp needs a model torch.onnx.export(..., dynamo=False) accepts: replace data-dependent "
            "Python control flow and unsupported custom ops, or wrap them"
        ) from exc
    return path


def check_parity(model: "torch.nn.Module", onnx_path: Path, inputs: "torch.Tensor",
                 atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Run ``inputs`` through torch and ONNX Runtime; return the largest absolute difference.

    Raises :class:`ExportError` when they disagree beyond ``atol + rtol * |torch|``.
    """
    import torch

    from autocomp.ort import run_batches

    with torch.no_grad():
        expected = model.eval()(inputs).float().numpy()
    got = run_batches(onnx_path, inputs.numpy())
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from torch's {expected.shape}")
    diff = np.abs(got - expected)
    limit = atol + rtol * np.abs(expected)
    if not np.all(diff <= limit):
        raise ExportError(
            f"ONNX export disagrees with torch: max abs difference {float(diff.max()):.3g} exceeds "
            f"atol={atol} + rtol={rtol}*|x|; the model may use ops whose export is not faithful"
        )
    return float(diff.max())
