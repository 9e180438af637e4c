"""The ``remote`` target: latency measured on a real device running ``autocomp agent serve``.

Options (``configure``): ``agent`` (required), the agent's URL, e.g. ``http://jetson.local:8765``;
``token_file`` (optional), a file holding the agent token. Without ``token_file`` the token comes from
``$AUTOCOMP_AGENT_TOKEN``; it is never given on the command line.

Cheap to import: the HTTP client is imported when the target is configured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.errors import TargetError
from autocomp.hookspecs import hookimpl
from autocomp.target import LatencyStats, Target

__all__ = ["RemoteTarget"]

_OPTIONS = ("agent", "token_file")


class RemoteTarget(Target):
    """A device reached over HTTP; the agent there times the model with ONNX Runtime."""

    name = "remote"
    measured = True
    # The agent runs whatever ONNX Runtime runs: float models and QDQ-quantized int8 ones.
    precisions = frozenset({"fp32", "fp16", "int8"})
    description = "a real device running `autocomp agent serve` (options: agent=URL, token_file=FILE)"

    def __init__(self, agent_url: str | None = None, token: str | None = None, *, policy: Any = None):
        """Unconfigured when ``agent_url`` is None (as registered); ``policy`` (a
        :class:`autocomp.ort.TimingPolicy`) overrides the agent's timing policy."""
        self.agent_url = agent_url
        self.policy = policy
        self._client = None
        if agent_url is not None:
            from autocomp.agent.client import AgentClient

            self._client = AgentClient(agent_url, token or "")

    def __repr__(self) -> str:
        return f"RemoteTarget({self.agent_url!r})"

    def configure(self, options: Mapping[str, Any]) -> "RemoteTarget":
        """A target talking to ``options["agent"]``, with the token from ``token_file`` or the environment.

        Raises :class:`TargetError` for unknown options or a missing URL, and
        :class:`autocomp.errors.ConfigError` when no token is set.
        """
        from autocomp.agent.client import load_token

        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TargetError(f"target 'remote' takes the options {list(_OPTIONS)}, but got {unknown}; remove them")
        url = options.get("agent")
        if not url:
            raise TargetError("target 'remote' needs the agent's URL: pass --agent http://DEVICE:8765 "
                              "(the address `autocomp agent serve` logs on the device)")
        token_file = options.get("token_file")
        token = load_token(os.environ, Path(token_file) if token_file else None)
        return RemoteTarget(str(url), token, policy=self.policy)

    def _connected(self) -> Any:
        if self._client is None:
            raise TargetError("target 'remote' is not configured: pass --agent http://DEVICE:8765")
        return self._client

    def latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> LatencyStats:
        """Upload the model to the agent and return its measurement (facts: the device's facts).

        Raises :class:`autocomp.errors.CandidateError` when the agent rejects the model (too large,
        corrupt, timed out, cannot run), :class:`autocomp.errors.InfrastructureError` when it cannot
        be reached, :class:`TargetError` when it refuses the token.
        """
        return self._connected().measure(onnx_path, input_shapes, policy=self.policy, target=self.name).stats

    def facts(self) -> dict[str, Any]:
        """The agent's URL and version, and the device's facts (asks the agent once)."""
        if self._client is None:
            return {}
        health = self._client.health()
        return {"agent_url": self.agent_url, "agent_version": health.get("agent_version"),
                "providers": health.get("measure_providers"), **health.get("device", {})}


@hookimpl
def register_targets(register):
    register(RemoteTarget())
