"""``autocomp agent serve``: a small HTTP service that measures ONNX models on the device it runs on.

The search runs elsewhere and reaches the agent through the ``remote`` target. Standard library HTTP
(``http.server``), JSON answers, one measurement at a time, each in a fresh child process.

HTTP API (version 1)
====================

Every request carries ``Authorization: Bearer <token>``; the token is compared in constant time.
A missing or wrong token gets ``401`` with no further detail, whatever the path.

``GET /v1/health``
    ``200``: ``{"status": "ok", "agent_version", "api_version", "device": {host facts: onnxruntime,
    cpu_model, cpu_count, machine, system, hostname}, "providers": [available ONNX Runtime execution
    providers], "measure_providers": [those measurements use], "limits": {"max_upload_bytes",
    "time_limit_s", "max_pending", "queue_wait_s"}, "policy": {the default timing policy}}``.

``POST /v1/measure``
    Body: the raw ONNX file (``Content-Type: application/octet-stream``), with ``Content-Length``
    (chunked uploads are not accepted). Headers:

    - ``X-Autocomp-Input-Shapes`` (required): JSON object, input name -> list of positive ints,
      e.g. ``{"input": [1, 3, 32, 32]}``.
    - ``X-Autocomp-Timing-Policy`` (optional): JSON object with any fields of
      :class:`autocomp.ort.TimingPolicy` (``threads``, ``warmup_runs``, ``warmup_s``, ``min_runs``,
      ``min_s``, ``max_runs``); the others come from the agent's policy.
    - ``Expect: 100-continue`` is honoured: the token, the size and the headers are checked before
      the client sends the body.

    ``200``: ``{"stats": LatencyStats.to_dict(), "device": {...}, "cached": bool, "sha256": hex,
    "agent_version": str}``. ``stats.facts`` holds the thread count and the providers the session used.

Errors are ``{"error": code, "message": text}``:

- ``400`` bad_request: a missing or malformed header, an unknown timing-policy field, a short body.
- ``401`` unauthorized. ``404`` not_found. ``405`` method_not_allowed. ``411`` length_required.
- ``413`` too_large: ``Content-Length`` over the upload cap (also ``"max_upload_bytes"``); the body
  is never read.
- ``422`` model_rejected: not an ONNX file, references external data, ONNX Runtime cannot load or
  run it, it crashed the runtime, or it ran past the time limit ("timed out after N s"); the child
  running it is killed.
- ``503`` busy, with ``Retry-After`` (seconds): ``max_pending`` measure requests are already in
  the agent, or this one waited ``queue_wait_s`` for its turn. Clients retry with backoff.
- ``500`` internal: the measurement worker could not start; see the agent's log.

Concurrency: one measurement at a time. Further requests queue (FIFO is not guaranteed) for up to
``queue_wait_s`` each, at most ``max_pending`` requests in the agent at once, so uploads waiting
their turn bound the disk and memory the agent uses. A repeated model (same SHA-256 of the bytes,
same input shapes, same effective timing policy) is answered from an in-memory LRU cache without
running it, with ``"cached": true``.

The agent speaks plain HTTP: bind it to 127.0.0.1 (the default) and reach it through an SSH
tunnel, or use ``--host 0.0.0.0`` only on a network you trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import platform
import shutil
import socket
import socketserver
import tempfile
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping

from autocomp.agent._requests import _parse_policy, _parse_shapes, _Rejected, check_model_file
from autocomp.agent.client import API_VERSION, POLICY_HEADER, SHAPES_HEADER, TOKEN_ENV_VAR, load_token
from autocomp.errors import ConfigError
from autocomp.ort import TimingPolicy

__all__ = ["AgentConfig", "AgentServer", "make_server", "serve", "load_token", "API_VERSION"]

logger = logging.getLogger("autocomp.agent")

MIB = 1024 * 1024

#: Seconds a refused (busy) client is told to wait before it tries again.
RETRY_AFTER_S = 2
#: Bodies of refused requests are read and dropped, so that closing the socket does not reset the
#: connection before the client has read the refusal: up to this size for an unauthenticated client,
#: up to the upload cap for an authenticated one (413 bodies are never read).
_DRAIN_LIMIT = 1 * MIB
_CHUNK = 1 * MIB


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """How the agent listens, authenticates and measures.

    :param token: the shared secret clients send as ``Authorization: Bearer <token>``; required.
    :param host: address to bind; ``127.0.0.1`` keeps the agent local (reach it through a tunnel).
    :param port: TCP port; 0 picks a free one (the server's ``url`` says which).
    :param max_upload_bytes: largest model accepted; larger uploads get 413 unread.
    :param time_limit_s: how long one model may take to load, warm up and be timed before the
        child process is killed.
    :param cache_size: how many measurements the in-memory cache keeps (0 disables it).
    :param policy: default timing policy; a request may override any of its fields.
    :param providers: execution providers to measure with; ``None`` picks TensorRT, then CUDA,
        then CPU, as available.
    :param max_pending: measure requests admitted at once (one runs, the others wait); more get 503.
    :param queue_wait_s: how long an admitted request waits for its turn before it gets 503.
    """

    token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8765
    max_upload_bytes: int = 256 * MIB
    time_limit_s: float = 120.0
    cache_size: int = 256
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    providers: tuple[str, ...] | None = None
    max_pending: int = 4
    queue_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise ConfigError(f"the agent needs a token: set {TOKEN_ENV_VAR} or pass --token-file FILE")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ConfigError(f"port must be an integer in 0..65535 (0 picks a free one), but got {self.port!r}")
        checks = [
            ("max_upload_bytes", self.max_upload_bytes > 0, "> 0"),
            ("time_limit_s", self.time_limit_s > 0, "> 0"),
            ("cache_size", self.cache_size >= 0, ">= 0 (0 disables the cache)"),
            ("max_pending", self.max_pending >= 1, ">= 1"),
            ("queue_wait_s", self.queue_wait_s >= 0, ">= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"agent setting {name} must be {rule}, but got {getattr(self, name)!r}")
        if self.providers is not None and not self.providers:
            raise ConfigError("providers must name at least one execution provider, or be None to pick automatically")


# --- the server ----------------------------------------------------------------------------------


class _LatencyCache:
    """A thread-safe LRU of measurement answers keyed by (SHA-256, shapes, policy)."""

    def __init__(self, size: int):
        self._size = size
        self._items: OrderedDict[Any, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> dict[str, Any] | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: dict[str, Any]) -> None:
        if self._size == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def _device_facts(config: AgentConfig) -> tuple[dict[str, Any], list[str], list[str]]:
    """(host facts, available providers, providers measurements use); validates ``config.providers``."""
    import onnxruntime

    from autocomp.agent._worker import preferred_providers
    from autocomp.ort import host_facts

    available = list(onnxruntime.get_available_providers())
    if config.providers is not None:
        missing = [p for p in config.providers if p not in available]
        if missing:
            raise ConfigError(f"execution provider(s) {missing} are not available in this ONNX Runtime; "
                              f"available: {available}")
        chosen = list(config.providers)
    else:
        chosen = preferred_providers(available)
    facts = host_facts(config.policy.threads)
    facts["hostname"] = platform.node()
    return facts, available, chosen


class AgentServer(ThreadingHTTPServer):
    """The agent's HTTP server: configuration, cache and the one-job-at-a-time lock."""

    daemon_threads = True

    def __init__(self, config: AgentConfig):
        from autocomp import __version__

        self.config = config
        self.version = __version__
        self.device, self.available_providers, self.measure_providers = _device_facts(config)
        self.cache = _LatencyCache(config.cache_size)
        self.job_lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._token = config.token.encode("utf-8")
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            super().__init__((config.host, config.port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"the agent cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); "
                "pick another --port (0 picks a free one) or stop what uses it"
            ) from exc

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds on boards
        # without DNS; the agent never needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` with the port actually bound."""
        host = self.server_address[0]
        return f"http://[{host}]:{self.server_port}" if ":" in host else f"http://{host}:{self.server_port}"

    def authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), self._token)

    def admit(self) -> bool:
        """Take one of the ``max_pending`` places for a measure request; False when none is free."""
        with self._pending_lock:
            if self._pending >= self.config.max_pending:
                return False
            self._pending += 1
            return True

    def leave(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "agent_version": self.version,
            "api_version": API_VERSION,
            "device": self.device,
            "providers": self.available_providers,
            "measure_providers": self.measure_providers,
            "limits": {
                "max_upload_bytes": self.config.max_upload_bytes,
                "time_limit_s": self.config.time_limit_s,
                "max_pending": self.config.max_pending,
                "queue_wait_s": self.config.queue_wait_s,
            },
            "policy": dataclasses.asdict(self.config.policy),
        }

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("agent: unexpected error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"  # for Expect: 100-continue; every answer still closes the connection
    server_version = "autocomp-agent"
    timeout = 60  # seconds a stalled client may hold a socket operation

    _body_read = False
    _responded = False
    _drain_limit = _DRAIN_LIMIT

    # --- plumbing ---

    def version_string(self) -> str:  # no Python version in the Server header
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("agent: %s %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True
        self._responded = True

    def _send_rejection(self, rejection: _Rejected) -> None:
        self._send_json(rejection.status, {"error": rejection.code, "message": str(rejection), **rejection.extra},
                        rejection.headers)

    def _drain_body(self) -> None:
        """Read and drop an unread body (within ``_drain_limit``), so the client reads our refusal."""
        if self._body_read:
            return
        self._body_read = True
        try:
            length = int(self.headers.get("Content-Length", 0))
            if 0 < length <= self._drain_limit:
                while length > 0:
                    chunk = self.rfile.read(min(_CHUNK, length))
                    if not chunk:
                        break
                    length -= len(chunk)
        except (ValueError, OSError):
            pass

    def _route(self, method: str) -> str:
        """The endpoint, after authentication; raises :class:`_Rejected` (401, 404, 405)."""
        if not self.server.authorized(self.headers.get("Authorization")):
            logger.warning("agent: refused %s %s from %s: missing or wrong token",
                           self.command, self.path[:100], self.address_string())
            raise _Rejected(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        self._drain_limit = self.server.config.max_upload_bytes
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        allowed = {"/v1/health": "GET", "/v1/measure": "POST"}.get(path)
        if allowed is None:
            raise _Rejected(404, "not_found", f"no endpoint {path!r}; endpoints: GET /v1/health, POST /v1/measure")
        if allowed != method:
            raise _Rejected(405, "method_not_allowed", f"{path} takes {allowed}", {"Allow": allowed})
        return path

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise _Rejected(411, "length_required", "chunked uploads are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise _Rejected(411, "length_required", "send the model's size in Content-Length")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError(raw)
        except ValueError as exc:
            raise _Rejected(400, "bad_request",
                            f"Content-Length must be a non-negative integer, but got {raw!r}") from exc
        cap = self.server.config.max_upload_bytes
        if length > cap:
            raise _Rejected(413, "too_large",
                            f"the model is {length} bytes, over the agent's upload limit of {cap} bytes",
                            extra={"max_upload_bytes": cap})
        if length == 0:
            raise _Rejected(422, "model_rejected", "empty body: upload the ONNX file as the request body")
        return length

    def _precheck_measure(self) -> tuple[int, dict[str, list[int]], TimingPolicy]:
        """Everything that can be judged from the headers alone: raises :class:`_Rejected`."""
        self._route("POST")
        length = self._content_length()
        shapes = _parse_shapes(self.headers.get(SHAPES_HEADER))
        policy = _parse_policy(self.headers.get(POLICY_HEADER), self.server.config.policy)
        return length, shapes, policy

    # --- entry points (called by BaseHTTPRequestHandler) ---

    def handle_expect_100(self) -> bool:
        if self.command == "POST":
            try:
                self._precheck_measure()
            except _Rejected as rejection:
                self._body_read = True  # the client has not sent it and will not
                self._send_rejection(rejection)
                return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def do_PUT(self) -> None:
        self._guarded(self._other)

    do_DELETE = do_PATCH = do_PUT

    def _guarded(self, action: Any) -> None:
        """Run ``action``; turn refusals into answers and any bug into a 500, never into a dead agent."""
        try:
            action()
        except _Rejected as rejection:
            self._drain_body()
            self._send_rejection(rejection)
        except (ConnectionError, TimeoutError) as exc:  # the client went away or stalled
            logger.warning("agent: %s %s from %s dropped: %s", self.command, self.path[:100],
                           self.address_string(), exc)
            self.close_connection = True
        except Exception:
            logger.exception("agent: internal error on %s %s", self.command, self.path[:100])
            if not self._responded:
                try:
                    self._send_json(500, {"error": "internal", "message": "internal error; see the agent's log"})
                except OSError:
                    pass
            self.close_connection = True

    def _other(self) -> None:
        self._route(self.command)

    def _get(self) -> None:
        self._route("GET")
        self._send_json(200, self.server.health())

    def _post(self) -> None:
        length, shapes, policy = self._precheck_measure()
        if not self.server.admit():
            raise _Rejected(503, "busy", f"the agent already holds {self.server.config.max_pending} measure "
                                         "requests; retry later", {"Retry-After": str(RETRY_AFTER_S)})
        try:
            workdir = Path(tempfile.mkdtemp(prefix="autocomp-agent-"))  # mode 0700: private to this user
            try:
                self._measure(workdir, length, shapes, policy)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            self.server.leave()

    def _receive_body(self, length: int, path: Path) -> str:
        """Stream the body to ``path``; return its SHA-256. Raises :class:`_Rejected` on a short body."""
        digest = hashlib.sha256()
        received = 0
        self._body_read = True
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            while received < length:
                chunk = self.rfile.read(min(_CHUNK, length - received))
                if not chunk:
                    raise _Rejected(400, "bad_request", f"the body ended after {received} of {length} bytes")
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
        return digest.hexdigest()

    def _measure(self, workdir: Path, length: int, shapes: dict[str, list[int]], policy: TimingPolicy) -> None:
        # Imported here: the worker module is also the child's __main__ (python -m), and importing it
        # from the package would make runpy warn.
        from autocomp.agent._worker import run_in_child

        server = self.server
        model_path = workdir / "model.onnx"
        sha256 = self._receive_body(length, model_path)
        key = (sha256, json.dumps(shapes, sort_keys=True), tuple(sorted(dataclasses.asdict(policy).items())))
        if self._answer_from_cache(key):
            return
        check_model_file(model_path)

        if not server.job_lock.acquire(timeout=server.config.queue_wait_s):
            raise _Rejected(503, "busy", f"waited {server.config.queue_wait_s:g} s for the running measurement "
                                         "to finish; retry later", {"Retry-After": str(RETRY_AFTER_S)})
        try:
            if self._answer_from_cache(key):  # an identical request may have run while we waited
                return
            logger.info("agent: measuring %s (%d bytes, shapes %s)", sha256[:12], length, shapes)
            result = run_in_child(str(model_path), shapes, dataclasses.asdict(policy),
                                  server.config.time_limit_s, server.measure_providers)
        finally:
            server.job_lock.release()

        if result.status == "rejected":
            logger.info("agent: model %s rejected: %s", sha256[:12], result.reason)
            raise _Rejected(422, "model_rejected", result.reason)
        if result.status != "ok":
            logger.error("agent: measurement worker failed: %s", result.reason)
            raise _Rejected(500, "internal", f"the measurement worker failed: {result.reason}")
        answer = {"stats": dict(result.stats or {}), "device": server.device, "sha256": sha256,
                  "agent_version": server.version}
        server.cache.put(key, answer)
        self._send_json(200, {**answer, "cached": False})

    def _answer_from_cache(self, key: Any) -> bool:
        cached = self.server.cache.get(key)
        if cached is None:
            return False
        logger.info("agent: model %s answered from the cache", key[0][:12])
        self._send_json(200, {**cached, "cached": True})
        return True


# --- entry points ------------------------------------------------------------------------------


def _log_start(server: AgentServer) -> None:
    config = server.config
    logger.info("autocomp agent %s listening on %s (measuring with %s; upload limit %g MiB; time limit %g s)",
                server.version, server.url, ", ".join(server.measure_providers),
                round(config.max_upload_bytes / MIB, 3), config.time_limit_s)
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("the agent listens on %s over plain HTTP: the token and the models travel unencrypted; "
                       "use it only on a network you trust, or keep 127.0.0.1 and an SSH tunnel", config.host)


def make_server(config: AgentConfig) -> tuple[AgentServer, threading.Thread]:
    """Start an agent serving in a background thread; for tests and embedding.

    Returns the server (``server.url`` has the bound port) and its thread. Stop it with
    ``server.shutdown(); server.server_close()``. Raises :class:`ConfigError` when it cannot listen.
    """
    server = AgentServer(config)
    thread = threading.Thread(target=server.serve_forever, name="autocomp-agent", daemon=True)
    thread.start()
    _log_start(server)
    return server, thread


def serve(config: AgentConfig) -> None:
    """Run the agent in this thread until interrupted (Ctrl-C returns normally).

    Raises :class:`ConfigError` when it cannot listen or a requested provider is missing.
    """
    with AgentServer(config) as server:
        _log_start(server)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            logger.info("autocomp agent stopped")
