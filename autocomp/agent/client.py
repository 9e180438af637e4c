"""Client side of the device agent: the token, and an HTTP client that uploads models to measure.

Standard library only (``http.client``), so importing it costs nothing. The HTTP API it speaks is
described in :mod:`autocomp.agent.server`.

Errors, mapped for the search:

- the agent cannot be reached, answers 5xx, or stays busy -> :class:`InfrastructureError`
- the agent refuses the token (401) or does not understand the request -> :class:`TargetError`
- the agent rejects the model (413 too large, 422 corrupt, external data, timed out, failed to run)
  -> :class:`CandidateError` carrying the agent's reason
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import stat
import time
import urllib.parse
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.errors import CandidateError, ConfigError, InfrastructureError, TargetError
from autocomp.target import LatencyStats

__all__ = ["API_VERSION", "TOKEN_ENV_VAR", "AgentClient", "Measurement", "load_token"]

logger = logging.getLogger("autocomp.agent")

#: Environment variable holding the shared secret of the agent and its clients.
TOKEN_ENV_VAR = "AUTOCOMP_AGENT_TOKEN"

#: Version of the HTTP API (the ``/v1/`` in its paths); the agent reports it in ``/v1/health``.
API_VERSION = 1

#: Headers of ``POST /v1/measure`` (see :mod:`autocomp.agent.server`).
SHAPES_HEADER = "X-Autocomp-Input-Shapes"
POLICY_HEADER = "X-Autocomp-Timing-Policy"

_BUSY_STATUSES = (429, 503)
#: Added to the agent's queue wait and time limit when waiting for a measurement (worker start-up).
_ANSWER_MARGIN_S = 180.0


def load_token(env: Mapping[str, str] = os.environ, token_file: str | os.PathLike[str] | None = None) -> str:
    """The agent token: the contents of ``token_file`` when given, else ``$AUTOCOMP_AGENT_TOKEN``.

    Tokens never travel on the command line, where ``ps`` and shell history would show them.
    Surrounding whitespace (a trailing newline) is stripped.

    Raises :class:`ConfigError` when neither is set, the file cannot be read, or it is empty.
    """
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(
                f"cannot read the agent token file {str(path)!r}: {exc.strerror or exc}; "
                f"create it (e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\" > {path}`) "
                f"or set {TOKEN_ENV_VAR} instead"
            ) from exc
        if not token:
            raise ConfigError(f"the agent token file {str(path)!r} is empty; write the token into it")
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("agent token file %s is readable by other users; `chmod 600 %s`", path, path)
        return token
    token = env.get(TOKEN_ENV_VAR, "").strip()
    if not token:
        raise ConfigError(
            f"no agent token: set the environment variable {TOKEN_ENV_VAR} or pass --token-file FILE "
            "(the same token on the device and on the machine running the search; generate one with "
            "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`)"
        )
    return token


@dataclass(frozen=True)
class Measurement:
    """What the agent answered for one model."""

    stats: LatencyStats  # facts hold the device facts, the providers used and the agent's URL
    cached: bool  # True when the agent answered from its cache without running the model
    sha256: str  # of the uploaded bytes


def _policy_fields(policy: Any) -> dict[str, Any] | None:
    if policy is None:
        return None
    if is_dataclass(policy):
        return asdict(policy)
    return dict(policy)


class AgentClient:
    """Talks to one agent (``autocomp agent serve``) at ``url``.

    :param url: ``http://HOST:PORT`` (an ``https://`` URL works behind a TLS-terminating proxy;
        a path prefix is kept).
    :param token: the shared secret; see :func:`load_token`.
    :param connect_timeout_s: how long to wait for the TCP connection.
    :param max_busy_retries: how many times to retry a measurement the agent answers 429/503
        (busy) before giving up with :class:`InfrastructureError`.
    :param backoff_s: first wait between busy retries; it doubles up to ``max_backoff_s``, and a
        ``Retry-After`` header from the agent is honoured within that bound.
    """

    def __init__(self, url: str, token: str, *, connect_timeout_s: float = 10.0, max_busy_retries: int = 8,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TargetError(
                f"the agent URL must look like http://HOST:PORT, but got {url!r}; "
                "use the address `autocomp agent serve` logs when it starts"
            )
        if not token:
            raise ConfigError(f"no agent token given for {url}; set {TOKEN_ENV_VAR} or pass --token-file FILE")
        self.url = url.rstrip("/")
        self._parts = parts
        self._base_path = parts.path.rstrip("/")
        self._token = token
        self.connect_timeout_s = connect_timeout_s
        self.max_busy_retries = max_busy_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._health: dict[str, Any] | None = None

    def __repr__(self) -> str:  # never show the token
        return f"AgentClient({self.url!r})"

    # --- public -------------------------------------------------------------------------------

    def health(self, refresh: bool = False) -> dict[str, Any]:
        """The agent's ``GET /v1/health`` document: device facts, providers, limits, version.

        Fetched once per client unless ``refresh``. Raises :class:`TargetError` when the agent
        speaks another API version or refuses the token, :class:`InfrastructureError` when it
        cannot be reached.
        """
        if self._health is None or refresh:
            status, headers, body = self._request("GET", "/v1/health", read_timeout_s=30.0)
            if status != 200:
                self._raise_for(status, body, what="health check")
            if body.get("api_version") != API_VERSION:
                raise TargetError(
                    f"the agent at {self.url} speaks API version {body.get('api_version')!r}, this autocomp "
                    f"speaks {API_VERSION}; install the same autocomp version on the device and here"
                )
            self._health = body
        return self._health

    def measure(self, onnx_path: Path | str, input_shapes: Mapping[str, Sequence[int]], *,
                policy: Any = None, target: str = "remote", read_timeout_s: float | None = None) -> Measurement:
        """Upload ``onnx_path`` and return its latency on the agent's device.

        :param policy: a :class:`autocomp.ort.TimingPolicy` (or a mapping of some of its fields);
            ``None`` uses the agent's own policy.
        :param target: the name put into the returned :class:`LatencyStats`.
        :param read_timeout_s: how long to wait for the answer once the model is sent; by default
            the agent's queue wait and time limit plus a margin.

        A model over the agent's upload cap is refused here (:class:`CandidateError`) without
        sending it.
        """
        path = Path(onnx_path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CandidateError(f"cannot read the model {str(path)!r} to upload it: {exc}") from exc
        limits = self.health().get("limits", {})
        cap = limits.get("max_upload_bytes")
        if isinstance(cap, int) and size > cap:
            raise CandidateError(
                f"the model {path} is {size} bytes, over the upload limit of {cap} bytes of the agent at "
                f"{self.url}; restart the agent with a higher upload limit or shrink the model"
            )
        if read_timeout_s is None:
            read_timeout_s = (float(limits.get("queue_wait_s", 300)) + float(limits.get("time_limit_s", 120))
                              + _ANSWER_MARGIN_S)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            SHAPES_HEADER: json.dumps({name: [int(d) for d in shape] for name, shape in input_shapes.items()}),
        }
        fields = _policy_fields(policy)
        if fields is not None:
            headers[POLICY_HEADER] = json.dumps(fields)

        delay = self.backoff_s
        for attempt in range(self.max_busy_retries + 1):
            with path.open("rb") as body_file:
                status, reply_headers, body = self._request(
                    "POST", "/v1/measure", body=body_file, headers=headers, read_timeout_s=read_timeout_s
                )
            if status == 200:
                return self._measurement(body, target)
            if status in _BUSY_STATUSES and attempt < self.max_busy_retries:
                wait = min(self.max_backoff_s, max(delay, _retry_after(reply_headers)))
                wait += random.uniform(0, 0.1 * wait)  # spread workers that were refused together
                logger.info("agent %s is busy (HTTP %d); retrying in %.1f s", self.url, status, wait)
                time.sleep(wait)
                delay = min(self.max_backoff_s, delay * 2)
                continue
            self._raise_for(status, body, what=f"measuring {path}", model_size=size)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- internals ----------------------------------------------------------------------------

    def _measurement(self, body: Mapping[str, Any], target: str) -> Measurement:
        try:
            stats = dict(body["stats"])
            facts = {**dict(body.get("device", {})), **dict(stats.get("facts", {}))}
            facts["agent_url"] = self.url
            facts["agent_version"] = body.get("agent_version")
            facts["cached"] = bool(body.get("cached", False))
            stats.update(target=target, measured=True, facts=facts)
            return Measurement(LatencyStats.from_dict(stats), bool(body.get("cached", False)), str(body["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InfrastructureError(
                f"the agent at {self.url} sent a measurement autocomp cannot read ({exc!r}); "
                "run the same autocomp version on the device and here"
            ) from exc

    def _raise_for(self, status: int, body: Mapping[str, Any], *, what: str, model_size: int | None = None) -> None:
        message = str(body.get("message") or body.get("error") or f"HTTP {status}")
        if status == 401:
            raise TargetError(
                f"the agent at {self.url} refused the token (HTTP 401); check that {TOKEN_ENV_VAR} "
                "(or the --token-file) here holds the same token the agent was started with"
            )
        if status == 413:
            limit = body.get("max_upload_bytes")
            raise CandidateError(
                f"{what}: the model ({model_size} bytes) is over the agent's upload limit"
                f"{f' of {limit} bytes' if limit else ''}; restart the agent with a higher upload limit "
                "or shrink the model"
            )
        if status == 422:
            raise CandidateError(f"{what}: the agent at {self.url} rejected the model: {message}")
        if status in _BUSY_STATUSES:
            raise InfrastructureError(
                f"{what}: the agent at {self.url} stayed busy after {self.max_busy_retries} retries; "
                "give it fewer concurrent workers or run more agents"
            )
        if 400 <= status < 500:
            raise TargetError(
                f"{what}: the agent at {self.url} did not accept the request (HTTP {status}: {message}); "
                "run the same autocomp version on the device and here"
            )
        raise InfrastructureError(f"{what}: the agent at {self.url} failed (HTTP {status}: {message}); see its log")

    def _connection(self, read_timeout_s: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self._parts.hostname, self._parts.port, timeout=self.connect_timeout_s)
        conn.connect()
        # The agent sends nothing until the measurement is done, so reads get the long timeout.
        conn.sock.settimeout(read_timeout_s)
        return conn

    def _request(self, method: str, endpoint: str, *, body: Any = None, headers: Mapping[str, str] | None = None,
                 read_timeout_s: float) -> tuple[int, http.client.HTTPMessage, dict[str, Any]]:
        """Send one request; return (status, headers, JSON body). Network failures raise."""
        all_headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json", **(headers or {})}
        try:
            conn = self._connection(read_timeout_s)
        except OSError as exc:
            raise InfrastructureError(
                f"cannot reach the autocomp agent at {self.url} ({exc}); start it on the device with "
                "`autocomp agent serve --host 0.0.0.0` and check the URL, the port and the network"
            ) from exc
        try:
            try:
                conn.request(method, self._base_path + endpoint, body=body, headers=all_headers)
            except (BrokenPipeError, ConnectionResetError):
                # The agent may refuse an upload early (401, 413) and close; its answer is still readable.
                pass
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError as exc:
            raise InfrastructureError(
                f"no answer from the agent at {self.url} within {read_timeout_s:.0f} s; "
                "check that it is running and not stuck (its log says what it is doing)"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise InfrastructureError(
                f"the connection to the agent at {self.url} failed ({type(exc).__name__}: {exc}); "
                "check that the agent is still running and the network is up"
            ) from exc
        finally:
            conn.close()
        try:
            document = json.loads(raw) if raw else {}
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            document = {"message": raw[:200].decode("utf-8", "replace")}
        return response.status, response.headers, document


def _retry_after(headers: http.client.HTTPMessage) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0
