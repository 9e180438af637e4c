"""A workload: a trained model, its data splits, an example input and the metric to keep."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from autocomp.errors import WorkloadError

if TYPE_CHECKING:  # torch is heavy; import it only where it is used
    import numpy as np
    import torch

__all__ = ["Split", "Workload", "accuracy", "fingerprint", "resolve_workload"]


@dataclass(frozen=True)
class Split:
    """One data split held in memory: ``inputs[i]`` is one example, ``targets[i]`` its label."""

    inputs: "torch.Tensor"
    targets: "torch.Tensor"

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise WorkloadError(
                f"a split needs as many inputs as targets, got {len(self.inputs)} inputs and "
                f"{len(self.targets)} targets"
            )
        if len(self.inputs) == 0:
            raise WorkloadError("a split must hold at least one example, got an empty one")

    def __len__(self) -> int:
        return len(self.inputs)


def accuracy(outputs: "np.ndarray", targets: "np.ndarray") -> float:
    """Top-1 accuracy of class scores ``outputs`` (N x C) against integer labels ``targets``."""
    import numpy as np

    return float(np.mean(np.argmax(outputs, axis=1) == np.asarray(targets)))


@dataclass(frozen=True)
class Workload:
    """Everything a search needs to know about the user's model.

    - ``model``: the trained model, in eval mode; it is never modified (candidates are copies).
    - ``example_input``: one batch (batch size 1) of the shape latency is measured at.
    - ``train``: data for fine-tuning and calibration; ``val``: data the metric is computed on
      during the search; ``test``: optional held-out data for the final report.
    - ``metric``: ``metric(outputs, targets) -> float`` on numpy arrays, higher is better.
    - ``loss``: the training loss used by recovery methods (cross-entropy on logits by default).
    """

    name: str
    model: "torch.nn.Module"
    example_input: "torch.Tensor"
    train: Split
    val: Split
    test: Split | None = None
    metric: Callable[[Any, Any], float] = accuracy
    metric_name: str = "accuracy"
    batch_size: int = 64
    loss: Callable[[Any, Any], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        if not isinstance(self.model, torch.nn.Module):
            raise WorkloadError(
                f"workload {self.name!r}: model must be a torch.nn.Module, got {type(self.model).__name__}"
            )
        if not isinstance(self.example_input, torch.Tensor) or self.example_input.shape[:1] != (1,):
            raise WorkloadError(
                f"workload {self.name!r}: example_input must be a tensor with batch size 1, got "
                f"{getattr(self.example_input, 'shape', type(self.example_input).__name__)}"
            )
        splits = {"training": self.train, "validation": self.val, "test": self.test}
        for which, split in splits.items():
            if split is None and which == "test":  # the only optional one
                continue
            if not isinstance(split, Split):
                raise WorkloadError(f"workload {self.name!r}: the {which} split must be an autocomp.Split(inputs, "
                                    f"targets), got {type(split).__name__}")
            if tuple(split.inputs.shape[1:]) != tuple(self.example_input.shape[1:]):
                raise WorkloadError(
                    f"workload {self.name!r}: {which} inputs have shape {tuple(split.inputs.shape[1:])} "
                    f"per example but example_input has {tuple(self.example_input.shape[1:])}; they must match"
                )

    def compute_loss(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
        if self.loss is not None:
            return self.loss(outputs, targets)
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets)


def fingerprint(workload: "Workload") -> dict[str, str]:
    """SHA-256 digests of what a search's figures depend on: the model's weights and buffers (names,
    shapes, dtypes and values) and the validation split. A resumed search compares them with the
    ones its base model was measured with."""
    import hashlib

    import torch

    def data(value: Any) -> bytes:
        if not isinstance(value, torch.Tensor):  # a module's extra state
            return repr(value).encode()
        try:
            t = value.detach().cpu()
            t = (t.to_dense() if t.layout != torch.strided else t).resolve_conj().resolve_neg().contiguous()
            return f"{tuple(t.shape)}|{t.dtype}|".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()
        except Exception:  # noqa: BLE001 - an uninitialised (lazy) parameter, an exotic layout: its text
            return repr(value).encode()

    def digest(named: Any) -> str:
        h = hashlib.sha256()
        for name, value in named:
            h.update(f"{name}|".encode())
            h.update(data(value))
        return h.hexdigest()

    return {"model": digest(workload.model.state_dict().items()),
            "validation split": digest([("inputs", workload.val.inputs), ("targets", workload.val.targets)])}


def resolve_workload(spec: str, registered: dict[str, Callable[[], Workload]]) -> Workload:
    """Load the workload named ``spec``: a registered name, or ``module:function``.

    Raises :class:`WorkloadError` naming the problem and the fix when it cannot be loaded.
    """
    if ":" in spec:
        module_name, _, func_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import failure is the user's to fix
            raise WorkloadError(
                f"--workload {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                "check the module is on PYTHONPATH and imports cleanly"
            ) from exc
        factory = getattr(module, func_name, None)
        if not callable(factory):
            raise WorkloadError(
                f"--workload {spec!r}: module {module_name!r} has no callable {func_name!r}; "
                "give module:function where the function returns an autocomp Workload"
            )
    else:
        factory = registered.get(spec)
        if factory is None:
            known = ", ".join(sorted(registered)) or "none"
            raise WorkloadError(
                f"unknown workload {spec!r}; registered workloads: {known}; "
                "or give your own as module:function"
            )
    try:
        workload = factory()
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(
            f"workload {spec!r} failed to load ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload {spec!r} returned {type(workload).__name__}, expected autocomp.Workload"
        )
    return workload
