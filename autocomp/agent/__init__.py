"""The device agent: ``autocomp agent serve`` measures ONNX models on the device it runs on, for a
search running elsewhere (the ``remote`` target is its client).

- :mod:`autocomp.agent.server`: the HTTP service and its API (documented there).
- :mod:`autocomp.agent.client`: the token and the client the ``remote`` target uses.
"""

from autocomp.agent.client import TOKEN_ENV_VAR, AgentClient, Measurement, load_token
from autocomp.agent.server import AgentConfig, AgentServer, make_server, serve

__all__ = [
    "TOKEN_ENV_VAR",
    "AgentClient",
    "AgentConfig",
    "AgentServer",
    "Measurement",
    "load_token",
    "make_server",
    "serve",
]
