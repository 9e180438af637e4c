"""A fast latency estimate for the ``cpu`` target, calibrated on measurements from this host.

The ``cpu`` target measures every final artifact; this module lets the search drop a candidate
that cannot meet ``--max-latency`` *before* training it, from the ONNX graph alone, in a few
milliseconds. It is an estimate, not a measurement: ``benchmarks/cpu_predictor.md`` shows how
close it comes on this host.

The model
---------
The edge cost model's per-node analysis (:mod:`autocomp_plugins.edge.costmodel`: operator kind,
precision, MACs, elements moved, fusion of batch norm, activations, residual adds and Q/DQ) is
reduced to a few :data:`FEATURES`, each a sum over the graph per operator kind and precision
(computed in :mod:`autocomp_plugins._cpu_features`, re-exported here). Where
ONNX Runtime's CPU provider differs from the edge model's TensorRT-like view, the features follow
ONNX Runtime: a PRelu after a convolution is a kernel of its own (between NCHWc layout reorders),
an Add after a MatMul is not fused, an int8 residual Add is a QLinearAdd, Q/DQ pairs that QDQ fusion
leaves (fp32/int8 boundaries, requantization between an int8 convolution and its ReLU) are kernels,
and shape arithmetic runs at run time (the batch axis is dynamic). Convolutions are priced at the
channel counts ONNX Runtime computes, not the ones the graph declares: at fp32 its NCHWc layout pads
channels to whole blocks (16 with AVX-512, 8 with AVX2; :func:`nchwc_block` asks ONNX Runtime), and
int8 output channels are rounded up to :data:`INT8_CHANNEL_BLOCK`. An int8 convolution whose channel
counts rule out MLAS's symmetric int8 kernels (:func:`int8_conv_is_generic`) runs a generic path
several times slower per MAC, and is priced apart. The prediction is linear::

    latency_ms = sum(coefficient[f] * feature[f] for f in FEATURES)

with non-negative coefficients, so every term reads as a cost: milliseconds per million MACs of
a dense convolution at fp32, per million elements an element-wise kernel moves, per kernel, and
so on. They are fitted by non-negative least squares on the *relative* error (each row divided by
its measured latency), so a 0.2 ms model weighs as much as a 10 ms one. The cpu target runs fp32
and int8; other precisions are priced as fp32.

Calibrations
------------
A calibration is per host and per thread count (:class:`CpuCalibration`, keyed by CPU model,
instruction-set flags, ONNX Runtime version and threads). :func:`load_calibration` looks for

1. one written by :func:`autocomp_plugins.cpu_calibrate.calibrate_cpu` on this host, in ``$AUTOCOMP_CACHE_DIR/cpu_predictor/``
   (``~/.cache/autocomp`` when the variable is unset);
2. the one shipped with autocomp (``cpu_calibration.json``), measured on the host named in it;

and takes the entry whose host matches (and, where it records them, this host's
:data:`HOST_FEATURE_FACTS`) and whose thread count is the configured one. When only a
calibration of another host (or thread count) exists it is used anyway and a warning is logged:
the estimate may then be off by the ratio of the two machines' speeds.

Importing this module is cheap: onnx, onnxruntime, torch and scipy are imported where needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.results import write_json
from autocomp_plugins._cpu_features import (FEATURE_SET, FEATURES, HOST_FEATURE_FACTS, INT8_CHANNEL_BLOCK,
                                            graph_features, host_feature_facts, int8_conv_is_generic,
                                            l1d_bytes, nchwc_block)

__all__ = [
    "FEATURES",
    "FEATURE_SET",
    "FIT_TARGET",
    "HOST_FEATURE_FACTS",
    "INT8_CHANNEL_BLOCK",
    "SHIPPED_CALIBRATION",
    "CpuCalibration",
    "graph_features",
    "nchwc_block",
    "l1d_bytes",
    "host_feature_facts",
    "host_identity",
    "cache_path",
    "load_calibration",
    "read_calibrations",
    "write_calibrations",
    "predict_latency_ms",
    "int8_conv_is_generic",
    "fit_coefficients",
    "random_folds",
    "out_of_fold_ms",
]

logger = logging.getLogger("autocomp")

#: The calibration shipped with autocomp: this project's build host (see the file for its facts).
SHIPPED_CALIBRATION = Path(__file__).with_name("cpu_calibration.json")

FORMAT_VERSION = 1

#: What a calibration is fitted to (its ``fit["target"]``): the statistic the search measures by
#: default. Calibrations written before that (fitted on the p50) say otherwise and are passed over.
FIT_TARGET = "median of the rounds' fastest runs, TimingPolicy() defaults"


# --- host and calibration files -------------------------------------------------------------------


def host_identity() -> dict[str, str]:
    """What a calibration is valid for: CPU model, its vector ISA, and the ONNX Runtime version.

    The ISA flags are part of it because cloud CPUs often report a bare family name (``AMD EPYC``)
    for generations whose kernels differ (AVX2 vs AVX-512, with or without VNNI int8 dot products).
    """
    import onnxruntime as ort

    from autocomp.ort import cpu_flags, host_facts

    facts = host_facts()
    flags = cpu_flags()
    isa = sorted(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd",
                             "asimddp") if f in flags)
    return {"cpu_model": str(facts["cpu_model"]), "machine": platform.machine(),
            "isa": ",".join(isa), "onnxruntime": ort.__version__}


def cache_path(host: Mapping[str, str], threads: int) -> Path:
    """Where :func:`autocomp_plugins.cpu_calibrate.calibrate_cpu` writes (and :func:`load_calibration` looks for) a host's calibration."""
    from autocomp.cache import cache_dir

    key = json.dumps({k: host[k] for k in sorted(host)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir("cpu_predictor", f"{digest}-threads{threads}.json")


@dataclass(frozen=True)
class CpuCalibration:
    """Coefficients of the linear model for one host and thread count, with how they were obtained.

    ``host`` is :func:`host_identity` of the machine measured; ``fit`` holds the fit's facts (number
    of models, in-sample errors, machine load, date); ``source`` says where it was loaded from.
    """

    host: Mapping[str, str]
    threads: int
    coefficients: Mapping[str, float]
    fit: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.coefficients) - set(FEATURES))
        if unknown:
            raise ValueError(f"calibration has coefficients for unknown features {unknown}; "
                             f"known: {sorted(FEATURES)}")
        bad = {k: v for k, v in self.coefficients.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"calibration coefficients must be finite and >= 0, got {bad}")

    def predict(self, features: Mapping[str, float]) -> float:
        """Estimated latency (the fastest run, as the search measures by default) in ms for a graph's
        :func:`graph_features`."""
        return sum(self.coefficients.get(name, 0.0) * value for name, value in features.items())

    def differences(self, host: Mapping[str, str],
                    facts: Mapping[str, int] | None = None) -> dict[str, tuple[Any, Any]]:
        """``{name: (recorded here, given)}`` for each entry of ``host`` (:func:`host_identity`) and
        of ``facts`` (:func:`host_feature_facts`; a calibration that does not record them, fitted
        before 2026-12-07, is not checked on them) that this calibration was measured with otherwise."""
        out = {k: (self.host.get(k), v) for k, v in host.items() if self.host.get(k) != v}
        out.update({k: (self.fit[k], v) for k, v in (facts or {}).items() if k in self.fit and self.fit[k] != v})
        return out

    def matches(self, host: Mapping[str, str], facts: Mapping[str, int] | None = None) -> bool:
        """Whether this calibration was measured on ``host`` (and with ``facts``, when given)."""
        return not self.differences(host, facts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        data["host"] = dict(self.host)
        data["coefficients"] = {k: self.coefficients[k] for k in FEATURES if k in self.coefficients}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "CpuCalibration":
        return cls(host=dict(data["host"]), threads=int(data["threads"]),
                   coefficients={k: float(v) for k, v in data["coefficients"].items()},
                   fit=dict(data.get("fit", {})), source=source)


def read_calibrations(path: Path) -> list[CpuCalibration]:
    """Calibrations in a file: ``{"format": 1, "calibrations": [...]}``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: calibration format {data.get('format')!r}, expected {FORMAT_VERSION}")
    return [CpuCalibration.from_dict(c, source=str(path)) for c in data["calibrations"]]


def write_calibrations(path: Path, calibrations: Sequence[CpuCalibration]) -> Path:
    """Write ``calibrations`` to ``path`` atomically (temporary file, then rename)."""
    write_json(path, {"format": FORMAT_VERSION, "calibrations": [c.to_dict() for c in calibrations]})
    return path


def load_calibration(threads: int = 1, host: Mapping[str, str] | None = None,
                     shipped: Path = SHIPPED_CALIBRATION) -> CpuCalibration:
    """The calibration to predict with for ``threads`` intra-op threads on ``host`` (default: this one).

    Prefers this host's cached calibration (written by :func:`autocomp_plugins.cpu_calibrate.calibrate_cpu`), then the shipped one
    when it was measured on a host like this one. Otherwise it falls back to the shipped calibration
    nearest in thread count and logs a warning naming the difference. A calibration that records
    :data:`HOST_FEATURE_FACTS` other than this host's counts as another host's (not checked when
    ``host`` is given: its facts are not known here). Raises ``FileNotFoundError`` when there is no
    calibration at all.
    """
    facts = None if host is not None else host_feature_facts()  # a given host's are not known here
    host = dict(host or host_identity())
    cached = cache_path(host, threads)
    if cached.exists():
        try:
            for calibration in read_calibrations(cached):
                if calibration.matches(host) and calibration.threads == threads:
                    differ = calibration.differences(host, facts)  # the host matches: only facts can differ
                    if differ:
                        logger.warning("cpu predictor: the calibration in %s was measured on another CPU (%s); "
                                       "using the shipped one. Run `autocomp calibrate --target cpu` to calibrate "
                                       "this host again", cached, _facts_text(differ))
                        break
                    if calibration.fit.get("target", FIT_TARGET) != FIT_TARGET:
                        # fitted before the search measured the fastest run: it predicts the p50
                        logger.warning("cpu predictor: the calibration in %s was fitted on the p50, not on the "
                                       "fastest run the search measures; using the shipped one. Run `autocomp "
                                       "calibrate --target cpu` to calibrate this host again", cached)
                        break
                    if calibration.fit.get("feature_set", 1) != FEATURE_SET:
                        logger.warning("cpu predictor: the calibration in %s was fitted on an older version of "
                                       "the predictor's features; using the shipped one. Run `autocomp "
                                       "calibrate --target cpu` to calibrate this host again", cached)
                        break
                    return calibration
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("cpu predictor: ignoring unreadable calibration %s (%s)", cached, exc)
    options = read_calibrations(shipped) if shipped.exists() else []
    if not options:
        raise FileNotFoundError(f"no cpu calibration: {cached} and {shipped} are missing; run "
                                "`autocomp calibrate --target cpu`")
    same_host = [c for c in options if c.matches(host, facts)]
    for calibration in same_host:
        if calibration.threads == threads:
            return calibration
    pool = same_host or options
    best = min(pool, key=lambda c: (abs(c.threads - threads), c.threads))
    if same_host:
        why = f"it was calibrated for {best.threads} thread(s), not {threads}"
    else:
        why = f"it was calibrated on another host ({_facts_text(best.differences(host, facts))})"
    logger.warning("cpu predictor: %s, so latency estimates may be off by the speed ratio; run "
                   "`autocomp calibrate --target cpu --threads %d` to calibrate this host", why, threads)
    return best


def _facts_text(differ: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())


def predict_latency_ms(onnx_path: Path | str, input_shapes: Mapping[str, Sequence[int]],
                       calibration: CpuCalibration) -> float:
    """Estimated latency (ms; the fastest timed run) of an ONNX model on the calibrated host.

    An estimate from the graph's structure, not a measurement. Raises
    :class:`autocomp.errors.CandidateError` when the graph cannot be analysed.
    """
    return calibration.predict(graph_features(onnx_path, input_shapes))


# --- fitting --------------------------------------------------------------------------------------


def fit_coefficients(rows: Sequence[Mapping[str, float]], latencies_ms: Sequence[float],
                     features: Sequence[str] = tuple(FEATURES)) -> dict[str, float]:
    """Non-negative coefficients minimising the squared *relative* error of the linear model.

    ``rows`` are :func:`graph_features` of the measured graphs, ``latencies_ms`` their measured latency.
    Features no row uses get coefficient 0. Raises ``ValueError`` for mismatched or empty input.
    """
    import numpy as np
    from scipy.optimize import nnls

    if not rows or len(rows) != len(latencies_ms):
        raise ValueError(f"need one latency per row and at least one row, got {len(rows)} rows "
                         f"and {len(latencies_ms)} latencies")
    y = np.asarray(latencies_ms, dtype=float)
    x = np.array([[r.get(f, 0.0) for f in features] for r in rows], dtype=float)
    a = x / y[:, None]  # relative error: (x.c - y) / y = x/y . c - 1
    scale = np.where(np.abs(a).max(axis=0) > 0, np.abs(a).max(axis=0), 1.0)  # conditioning only
    c, _ = nnls(a / scale, np.ones_like(y), maxiter=50 * len(features))
    return {f: float(v) for f, v in zip(features, c / scale)}


def random_folds(n: int, k: int = 5, seed: int = 0) -> list[list[int]]:
    """``k`` disjoint groups of the indices ``0 .. n-1``, shuffled deterministically in ``seed``."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    return [order[f::k].tolist() for f in range(k)]


def out_of_fold_ms(rows: Sequence[Mapping[str, float]], latencies_ms: Sequence[float],
                   groups: Sequence[Sequence[int]], features: Sequence[str] = tuple(FEATURES)) -> list[float]:
    """Each row's prediction (ms) from coefficients fitted on every group but its own: the
    cross-validated figure a calibration reports (``groups`` from :func:`random_folds`, or by family)."""
    predicted = [math.nan] * len(rows)
    for test in groups:
        held = set(test)
        train = [i for i in range(len(rows)) if i not in held]
        coefficients = fit_coefficients([rows[i] for i in train], [latencies_ms[i] for i in train], features)
        for i in test:
            predicted[i] = sum(coefficients[f] * rows[i].get(f, 0.0) for f in features)
    return predicted
