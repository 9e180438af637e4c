"""The child process that loads and times one uploaded model, and the parent's side of running it.

Each measurement runs in a fresh Python process (``python -m autocomp.agent._worker``), so that a
model which hangs, exhausts memory or crashes ONNX Runtime takes down only that process; the agent
kills it when it runs past the time limit. A fresh process also hands back all device memory
(CUDA, TensorRT) after every job. A plain subprocess rather than ``multiprocessing`` because the
"spawn" start method re-runs the parent's ``__main__``, which breaks any script that calls
:func:`autocomp.agent.serve` without an ``if __name__ == "__main__"`` guard.

Protocol: the parent writes one JSON job to the child's stdin; the child answers with JSON lines on
its stdout: ``{"kind": "ready"}`` once ONNX Runtime is imported (the time limit starts then, so a
slow import on a small board is not counted), then ``{"kind": "ok", "stats": {...}}`` or
``{"kind": "rejected", "reason": "..."}`` (``"failed"`` when the child itself cannot work).
Anything else the child's libraries print goes to stderr, which the agent's own stderr receives.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

__all__ = ["JobResult", "run_in_child", "preferred_providers"]

logger = logging.getLogger("autocomp.agent")

#: Execution providers the agent uses when available, fastest first; CPU is always the fallback.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

#: How long a child may take to import ONNX Runtime before the job is abandoned.
STARTUP_LIMIT_S = 120.0


def preferred_providers(available: Sequence[str]) -> list[str]:
    """The providers to measure with: TensorRT, then CUDA, then CPU, as far as they are available."""
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    return chosen or ["CPUExecutionProvider"]


@dataclass(frozen=True)
class JobResult:
    """Outcome of one child job.

    ``status`` is ``"ok"`` (``stats`` holds :meth:`LatencyStats.to_dict`), ``"rejected"`` (the
    model's fault: cannot load, cannot run, crashed the runtime, timed out; ``reason`` says which)
    or ``"failed"`` (the agent's fault: the child could not start).
    """

    status: str
    stats: Mapping[str, Any] | None = None
    reason: str = ""


# --- parent side -------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """The agent's environment, minus the token, plus the directory this autocomp is imported from."""
    import autocomp

    env = {k: v for k, v in os.environ.items() if k != "AUTOCOMP_AGENT_TOKEN"}
    source_root = str(Path(autocomp.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    return env


def _read_lines(stream: IO[bytes], messages: "queue.Queue[dict[str, Any]]") -> None:
    """Forward the child's JSON lines to ``messages``; ``{"kind": "eof"}`` when its stdout closes."""
    for line in stream:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            messages.put(message)
    messages.put({"kind": "eof"})


def run_in_child(model_path: str, input_shapes: Mapping[str, Sequence[int]], policy_fields: Mapping[str, Any],
                 time_limit_s: float, providers: Sequence[str] | None = None) -> JobResult:
    """Measure the model at ``model_path`` in a fresh child process; kill it after ``time_limit_s``.

    ``time_limit_s`` counts from the moment the child has imported ONNX Runtime: it covers loading
    the session, the warm-up and the timed runs. Never raises for anything the model does.
    """
    job = {"model_path": model_path, "input_shapes": {k: list(v) for k, v in input_shapes.items()},
           "policy": dict(policy_fields), "providers": list(providers) if providers else None}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "autocomp.agent._worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(), cwd=Path(model_path).parent,
        )
    except OSError as exc:
        return JobResult("failed", reason=f"cannot start the measurement worker: {exc}")
    messages: queue.Queue[dict[str, Any]] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, messages), daemon=True,
                              name="autocomp-agent-job-reader")
    reader.start()
    try:
        try:
            process.stdin.write(json.dumps(job).encode("utf-8"))
            process.stdin.close()
        except OSError:
            pass  # the child died at once; its exit shows as EOF below
        message = _next(messages, STARTUP_LIMIT_S)
        if message is None:
            return JobResult("failed", reason=f"the measurement worker did not start within {STARTUP_LIMIT_S:.0f} s")
        if message["kind"] == "eof":
            return JobResult("failed", reason=f"the measurement worker exited with code {process.wait()} "
                                              "before it was ready; see the agent's stderr")
        if message["kind"] != "ready":
            return JobResult("failed", reason=str(message.get("reason")))
        message = _next(messages, time_limit_s)
        if message is None:
            return JobResult("rejected", reason=f"timed out after {time_limit_s:g} s (the agent's time limit); "
                                                "the model is too slow for this device or never finishes")
        if message["kind"] == "ok":
            return JobResult("ok", stats=message["stats"])
        if message["kind"] == "eof":
            return JobResult("rejected", reason=f"the model crashed the runtime (worker exit code {process.wait()})")
        return JobResult(str(message["kind"]), reason=str(message.get("reason")))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=5)
        process.stdout.close()


def _next(messages: "queue.Queue[dict[str, Any]]", timeout_s: float) -> dict[str, Any] | None:
    try:
        return messages.get(timeout=timeout_s)
    except queue.Empty:
        return None


# --- child side ----------------------------------------------------------------------------------


def _child_main() -> None:
    # Keep a private copy of stdout for the protocol; whatever libraries print goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(kind: str, **payload: Any) -> None:
        protocol.write(json.dumps({"kind": kind, **payload}) + "\n")
        protocol.flush()

    job = json.loads(sys.stdin.read())
    try:
        import onnxruntime

        from autocomp.errors import CandidateError
        from autocomp.ort import TimingPolicy, measure_latency
    except Exception as exc:  # a broken install: report it instead of dying silently
        send("failed", reason=f"cannot import ONNX Runtime in the worker: {type(exc).__name__}: {exc}")
        return
    send("ready")
    model_path = job["model_path"]
    try:
        providers = job["providers"] or preferred_providers(onnxruntime.get_available_providers())
        stats = measure_latency(model_path, job["input_shapes"], TimingPolicy(**job["policy"]), target="agent",
                                providers=providers)
        send("ok", stats=stats.to_dict())
    except CandidateError as exc:
        send("rejected", reason=str(exc).replace(model_path, "the uploaded model"))
    except Exception as exc:  # numpy MemoryError on a huge shape, an ORT internal error ...
        send("rejected", reason=f"{type(exc).__name__}: {exc}".replace(model_path, "the uploaded model"))


if __name__ == "__main__":
    _child_main()
