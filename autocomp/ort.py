"""ONNX Runtime helpers shared by the engine, the ``cpu`` target and the device agent.

Latency is measured the same way for the base model and every candidate: one session with a fixed
thread count, sequential execution, full graph optimisation, a warm-up, then timed runs until both a
minimum count and a minimum time are reached. The fastest run, p50, p90 and mean are over all
timed runs.

Which of them to trust depends on the machine. On this project's shared 2-core VM the p50 of the
same model moved 17-26 % between repeats (median model, ``benchmarks/cpu_predictor.md``), while
the fastest run moved about 1 %: interference only ever adds time, so the fastest run is the best
estimate of what the model itself costs. The search optimises the fastest run by default (``--latency-statistic``).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from autocomp.errors import CandidateError
from autocomp.target import LatencyStats

__all__ = ["TimingPolicy", "session_options", "optimised_model", "make_session", "time_runs", "measure_latency",
           "run_batches", "host_facts", "cpu_flags", "input_shapes_of"]


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time a model. Defaults aim at a median stable to a few percent."""

    threads: int = 1
    warmup_runs: int = 10
    warmup_s: float = 0.2
    min_runs: int = 50
    min_s: float = 1.0
    max_runs: int = 100_000

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.min_runs < 1 or self.min_s < 0:
            raise ValueError(f"min_runs >= 1 and min_s >= 0 must hold, got ({self.min_runs}, {self.min_s})")


def session_options(threads: int = 1, optimize: bool = True) -> Any:
    """The session options every measurement uses: ``threads`` intra-op threads, sequential
    execution, full graph optimisation (none with ``optimize=False``, for a graph that is already
    ONNX Runtime's optimised one), warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    return options


def optimised_model(onnx_path: Path | str, out_path: Path | str) -> Any:
    """``onnx_path`` as ONNX Runtime runs it for a measurement (:func:`session_options`' full
    optimisation: fused kernels, QLinearConv, NCHWc layouts), saved to ``out_path`` and returned as
    an ``onnx.ModelProto``, one node per kernel. The saved graph is only valid on this host."""
    import onnx
    import onnxruntime as ort

    options = session_options(1)
    options.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out_path))


def make_session(onnx_path: Path | str, threads: int = 1, providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime inference session with a fixed thread count.

    Raises :class:`CandidateError` when the model cannot be loaded.
    """
    import onnxruntime as ort

    options = session_options(threads)
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:
        raise CandidateError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc


def input_shapes_of(example_input: Any) -> dict[str, tuple[int, ...]]:
    """Input shapes keyed by the ONNX input name autocomp exports with (``input``)."""
    return {"input": tuple(int(d) for d in example_input.shape)}


def _feeds(session: Any, input_shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = input_shapes.get(inp.name)
        if shape is None:
            raise CandidateError(
                f"no shape given for model input {inp.name!r}; known: {sorted(input_shapes)}"
            )
        dtype = np.float16 if "float16" in inp.type else np.float32
        feeds[inp.name] = rng.standard_normal(size=tuple(shape)).astype(dtype)
    return feeds


def time_runs(session: Any, feeds: Mapping[str, Any], policy: TimingPolicy = TimingPolicy()) -> list[float]:
    """Run ``session`` on ``feeds``: ``policy``'s warm-up, then timed runs until both its minimum
    count and minimum time are reached. Returns each timed run's wall time in ms."""
    start = time.perf_counter()
    runs = 0
    while runs < policy.warmup_runs or time.perf_counter() - start < policy.warmup_s:
        session.run(None, feeds)
        runs += 1
    times: list[float] = []
    start = time.perf_counter()
    while (len(times) < policy.min_runs or time.perf_counter() - start < policy.min_s) and len(times) < policy.max_runs:
        t0 = time.perf_counter_ns()
        session.run(None, feeds)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


def measure_latency(onnx_path: Path | str, input_shapes: Mapping[str, Sequence[int]],
                    policy: TimingPolicy = TimingPolicy(), *, target: str = "cpu",
                    providers: Sequence[str] | None = None) -> LatencyStats:
    """Time ``onnx_path`` on this host and return its fastest run, p50, p90 and mean in milliseconds."""
    session = make_session(onnx_path, policy.threads, providers)
    feeds = _feeds(session, input_shapes)
    try:
        times = time_runs(session, feeds, policy)
    except Exception as exc:
        raise CandidateError(f"ONNX Runtime failed to run {onnx_path}: {exc}") from exc
    arr = np.asarray(times)
    return LatencyStats(
        p50_ms=float(np.percentile(arr, 50)),
        p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()),
        runs=len(times),
        measured=True,
        target=target,
        facts={"threads": policy.threads, "providers": list(session.get_providers())},
        min_ms=float(arr.min()),
    )


def run_batches(onnx_path: Path | str, inputs: np.ndarray, batch_size: int = 256, threads: int | None = None) -> np.ndarray:
    """Run ``inputs`` through the model in batches and return the stacked first output."""
    session = make_session(onnx_path, threads or max(1, min(4, os.cpu_count() or 1)))
    name = session.get_inputs()[0].name
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    outputs = []
    try:
        for i in range(0, len(inputs), batch_size):
            outputs.append(session.run(None, {name: inputs[i : i + batch_size].astype(dtype)})[0])
    except Exception as exc:
        raise CandidateError(f"ONNX Runtime failed to run {onnx_path}: {exc}") from exc
    return np.concatenate(outputs, axis=0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields in ``path`` (/proc/cpuinfo); empty where there is none (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor ends at a blank line; the others repeat it
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """This CPU's feature flags (``avx2``, ``avx512f``, ``avx512_vnni`` ...; ``asimd``, ``asimddp`` on
    Arm), read from ``cpuinfo``; empty where unknown."""
    info = _cpuinfo(str(cpuinfo))
    return frozenset((info.get("flags") or info.get("Features", "")).split())  # x86 / Arm


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def host_facts(threads: int | None = None) -> dict[str, Any]:
    """Facts about this host and runtime, recorded with every measurement."""
    import onnxruntime as ort

    facts: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
    }
    if threads is not None:
        facts["threads"] = threads
    return facts
