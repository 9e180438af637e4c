"""autocomp: find compressed versions of a PyTorch model that run fast on a device, inside an
accuracy budget, and export them as ONNX.

The public surface for plugin authors and embedders is re-exported here. Importing this package is
cheap: torch, onnx and onnxruntime are imported only by the functions that need them.
"""

from autocomp.errors import AutocompError
from autocomp.hookspecs import hookimpl
from autocomp.method import (
    BaseModelInfo,
    CandidateContext,
    ChoiceParam,
    FixedParam,
    FloatParam,
    IntParam,
    Method,
)
from autocomp.target import LatencyStats, Target
from autocomp.workload import Split, Workload, accuracy

__version__ = "0.1.0"

__all__ = [
    "AutocompError",
    "BaseModelInfo",
    "CandidateContext",
    "ChoiceParam",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "LatencyStats",
    "Method",
    "Split",
    "Target",
    "Workload",
    "accuracy",
    "hookimpl",
    "__version__",
]
