"""The device agent (``autocomp agent serve``) and the ``remote`` target, against a real agent on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from autocomp.agent import AgentClient, AgentConfig, load_token, make_server
from autocomp.agent.client import POLICY_HEADER, SHAPES_HEADER, TOKEN_ENV_VAR
from autocomp.errors import CandidateError, ConfigError, InfrastructureError, TargetError
from autocomp.ort import TimingPolicy
from autocomp_plugins.remote_target import RemoteTarget

TOKEN = "test-token-0123456789"
FAST = TimingPolicy(threads=1, warmup_runs=1, warmup_s=0.0, min_runs=5, min_s=0.01)
SHAPES = {"input": [1, 8]}
UPLOAD_CAP = 64 * 1024


# --- models -------------------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def tiny_model(path: Path, seed: int = 0, width: int = 4) -> Path:
    """input [1, 8] -> MatMul [8, width] -> Relu; ``seed`` changes the weights (and so the SHA-256)."""
    weight = np.random.default_rng(seed).standard_normal((8, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Relu", ["h"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, width])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def endless_model(path: Path) -> Path:
    """A Loop of 10**15 MatMul+Tanh steps on a [1, 8] state: loads at once, never finishes."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["state_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 8]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "input"], ["output"], body=body)],
        "endless",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8])],
        initializer=[
            numpy_helper.from_array(np.array(10**15, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.eye(8, dtype=np.float32), "w"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def external_data_model(path: Path) -> Path:
    """The tiny model with its weight moved to an external file (the reference only; no file)."""
    model = onnx.load(tiny_model(path))
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "128")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return _save(model, path)


# --- helpers ------------------------------------------------------------------------------------


def _request(url: str, method: str, endpoint: str, *, token: str | None = TOKEN, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, endpoint, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _measure_raw(url: str, model: Path, *, token: str = TOKEN, shapes=SHAPES, policy=FAST) -> tuple[int, dict]:
    headers = {SHAPES_HEADER: json.dumps(shapes), "Content-Type": "application/octet-stream"}
    if policy is not None:
        headers[POLICY_HEADER] = json.dumps(dataclasses.asdict(policy))
    return _request(url, "POST", "/v1/measure", token=token, body=model.read_bytes(), headers=headers)


def _assert_alive(url: str) -> None:
    status, body = _request(url, "GET", "/v1/health")
    assert status == 200 and body["status"] == "ok"


def _start(**overrides):
    config = AgentConfig(**{"token": TOKEN, "port": 0, "policy": FAST, "time_limit_s": 2.0,
                            "max_upload_bytes": UPLOAD_CAP, **overrides})
    return make_server(config)


@pytest.fixture(scope="module")
def agent():
    server, thread = _start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def client(agent) -> AgentClient:
    return AgentClient(agent.url, TOKEN)


# --- the agent ----------------------------------------------------------------------------------


def test_health_reports_device_facts(agent):
    status, body = _request(agent.url, "GET", "/v1/health")
    assert status == 200
    assert {"onnxruntime", "cpu_count", "machine"} <= set(body["device"])
    assert "CPUExecutionProvider" in body["providers"]
    assert body["limits"]["max_upload_bytes"] == UPLOAD_CAP
    assert body["agent_version"]


def test_measurement_returns_latency_stats(agent, client, tmp_path):
    model = tiny_model(tmp_path / "m.onnx", seed=1)
    result = client.measure(model, SHAPES, policy=FAST)
    stats = result.stats
    assert 0 < stats.p50_ms <= stats.p90_ms
    assert stats.runs >= FAST.min_runs and stats.measured
    assert stats.facts["providers"] == ["CPUExecutionProvider"]
    assert stats.facts["cpu_count"] and stats.facts["agent_url"] == agent.url
    assert result.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert not result.cached


def test_repeated_model_is_answered_from_cache(agent, tmp_path):
    model = tiny_model(tmp_path / "m.onnx", seed=2)
    first_status, first = _measure_raw(agent.url, model)
    second_status, second = _measure_raw(agent.url, model)
    assert (first_status, second_status) == (200, 200)
    assert first["cached"] is False and second["cached"] is True  # answered without measuring again
    assert second["stats"] == first["stats"]
    # Another timing policy is another measurement.
    other = TimingPolicy(warmup_runs=1, warmup_s=0, min_runs=6, min_s=0)
    assert _measure_raw(agent.url, model, policy=other)[1]["cached"] is False


@pytest.mark.parametrize("token", [None, "wrong-token", ""], ids=["missing", "wrong", "empty"])
def test_wrong_token_is_refused_and_agent_survives(agent, tmp_path, token):
    for method, endpoint in (("GET", "/v1/health"), ("GET", "/nowhere")):
        status, body = _request(agent.url, method, endpoint, token=token)
        assert status == 401
        assert set(body) == {"error", "message"} and "device" not in body
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    model = tiny_model(tmp_path / "m.onnx").read_bytes()
    status, _ = _request(agent.url, "POST", "/v1/measure", token=None, body=model,
                         headers={**headers, SHAPES_HEADER: json.dumps(SHAPES)})
    assert status == 401
    _assert_alive(agent.url)


@pytest.mark.parametrize("expect_continue", [False, True])
def test_oversized_upload_gets_413_unread(agent, expect_continue):
    parts = urllib.parse.urlsplit(agent.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/v1/measure")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(10 * 1024**3))  # 10 GiB announced; nothing is sent
    conn.putheader(SHAPES_HEADER, json.dumps(SHAPES))
    if expect_continue:
        conn.putheader("Expect", "100-continue")
    conn.endheaders()
    response = conn.getresponse()  # answered without the agent waiting for the body
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413
    assert body["error"] == "too_large" and body["max_upload_bytes"] == UPLOAD_CAP
    _assert_alive(agent.url)


def test_client_refuses_oversized_model_without_uploading(client, tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (UPLOAD_CAP + 1))
    with pytest.raises(CandidateError, match="over the upload limit"):
        client.measure(big, SHAPES)


@pytest.mark.parametrize("content", [b"this is not an onnx model", b"\xff" * 300, b"\x08\x09\x12"],
                         ids=["text", "garbage", "truncated"])
def test_corrupt_model_gets_422(agent, client, tmp_path, content):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(content)
    status, body = _measure_raw(agent.url, model)
    assert status == 422 and "not an ONNX model" in body["message"]
    with pytest.raises(CandidateError, match="not an ONNX model"):
        client.measure(model, SHAPES)
    _assert_alive(agent.url)


def test_external_data_model_gets_422(agent, tmp_path):
    status, body = _measure_raw(agent.url, external_data_model(tmp_path / "ext.onnx"))
    assert status == 422
    assert "external data" in body["message"] and "'w'" in body["message"]


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, SHAPES_HEADER),
        ({SHAPES_HEADER: "not json"}, "not JSON"),
        ({SHAPES_HEADER: '{"input": [1, -8]}'}, "positive integers"),
        ({SHAPES_HEADER: json.dumps(SHAPES), POLICY_HEADER: '{"min_runz": 3}'}, "min_runz"),
        ({SHAPES_HEADER: json.dumps(SHAPES), POLICY_HEADER: '{"threads": 0}'}, "threads"),
    ],
    ids=["no-shapes", "shapes-not-json", "negative-dim", "unknown-policy-field", "bad-policy-value"],
)
def test_malformed_request_gets_400(agent, tmp_path, headers, fragment):
    status, body = _request(agent.url, "POST", "/v1/measure", body=tiny_model(tmp_path / "m.onnx").read_bytes(),
                            headers=headers)
    assert status == 400 and fragment in body["message"]
    _assert_alive(agent.url)


@pytest.mark.parametrize(
    ("method", "endpoint", "status"),
    [("GET", "/v2/health", 404), ("POST", "/v1/health", 405), ("GET", "/v1/measure", 405), ("PUT", "/v1/measure", 405)],
)
def test_unknown_endpoint_or_method(agent, method, endpoint, status):
    assert _request(agent.url, method, endpoint)[0] == status


def test_empty_body_gets_422(agent):
    status, body = _request(agent.url, "POST", "/v1/measure", body=b"", headers={SHAPES_HEADER: json.dumps(SHAPES)})
    assert status == 422 and "empty body" in body["message"]


def test_model_failing_in_runtime_gets_422(agent, client, tmp_path):
    model = tiny_model(tmp_path / "m.onnx", seed=3)
    with pytest.raises(CandidateError, match="no shape given for model input 'input'"):
        client.measure(model, {"image": [1, 8]}, policy=FAST)


def test_model_past_time_limit_is_killed_and_reported(agent, client, tmp_path):
    started = time.perf_counter()
    with pytest.raises(CandidateError, match=r"timed out after 2 s"):
        client.measure(endless_model(tmp_path / "endless.onnx"), SHAPES, policy=FAST)
    assert time.perf_counter() - started < 20
    _assert_alive(agent.url)
    assert client.measure(tiny_model(tmp_path / "m.onnx", seed=4), SHAPES, policy=FAST).stats.p50_ms > 0


def test_concurrent_jobs_are_both_answered(agent, tmp_path):
    models = [tiny_model(tmp_path / f"m{i}.onnx", seed=10 + i) for i in range(2)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = AgentClient(agent.url, TOKEN).measure(models[i], SHAPES, policy=FAST)
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, model in enumerate(models):
        result = results[i]
        assert not isinstance(result, Exception), result
        assert result.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
        assert 0 < result.stats.p50_ms <= result.stats.p90_ms


def test_busy_agent_answers_503_and_client_retries(tmp_path):
    server, thread = _start(max_pending=1, queue_wait_s=0, max_upload_bytes=16 * 1024**2)
    try:
        endless = endless_model(tmp_path / "endless.onnx")
        slow = threading.Thread(target=_measure_raw, args=(server.url, endless))
        slow.start()
        deadline = time.monotonic() + 10
        while server._pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # A few MiB, more than the socket buffers hold: the refusal must still reach the client.
        model = tiny_model(tmp_path / "m.onnx", seed=5, width=256 * 1024)
        status, body = _measure_raw(server.url, model)
        assert status == 503 and body["error"] == "busy"
        # The client backs off and retries until the endless job has been killed.
        client = AgentClient(server.url, TOKEN, backoff_s=0.2, max_busy_retries=40, max_backoff_s=0.5)
        assert client.measure(model, SHAPES, policy=FAST).stats.p50_ms > 0
        slow.join(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_client_gives_up_on_a_busy_agent(tmp_path):
    server, thread = _start(max_pending=1, queue_wait_s=0)
    try:
        slow = threading.Thread(target=_measure_raw, args=(server.url, endless_model(tmp_path / "endless.onnx")))
        slow.start()
        deadline = time.monotonic() + 10
        while server._pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        client = AgentClient(server.url, TOKEN, backoff_s=0.05, max_busy_retries=2, max_backoff_s=0.05)
        with pytest.raises(InfrastructureError, match="stayed busy after 2 retries"):
            client.measure(tiny_model(tmp_path / "m.onnx"), SHAPES, policy=FAST)
        slow.join(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_agent_config_is_validated():
    with pytest.raises(ConfigError, match=TOKEN_ENV_VAR):
        AgentConfig(token="")
    with pytest.raises(ConfigError, match="time_limit_s must be > 0"):
        AgentConfig(token=TOKEN, time_limit_s=0)
    assert TOKEN not in repr(AgentConfig(token=TOKEN))
    config = AgentConfig(token=TOKEN)
    assert (config.host, config.port, config.max_upload_bytes) == ("127.0.0.1", 8765, 256 * 1024**2)


# --- the token ----------------------------------------------------------------------------------


def test_load_token_from_env_and_file(tmp_path):
    assert load_token({TOKEN_ENV_VAR: " from-env \n"}) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    assert load_token({}, token_file) == "from-file"
    assert load_token({TOKEN_ENV_VAR: "from-env"}, token_file) == "from-file"  # the explicit file wins


def test_load_token_errors_without_a_token(tmp_path):
    with pytest.raises(ConfigError, match=f"set the environment variable {TOKEN_ENV_VAR} or pass --token-file"):
        load_token({})
    with pytest.raises(ConfigError, match="cannot read the agent token file"):
        load_token({}, tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_token({TOKEN_ENV_VAR: "ignored"}, tmp_path / "empty")


# --- the remote target --------------------------------------------------------------------------


def test_remote_target_measures_through_the_agent(agent, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    target = RemoteTarget().configure({"agent": agent.url})
    stats = target.latency(tiny_model(tmp_path / "m.onnx", seed=6), SHAPES)
    assert stats.measured is True and stats.target == "remote"
    assert 0 < stats.p50_ms <= stats.p90_ms
    assert stats.facts["machine"] and stats.facts["agent_url"] == agent.url
    assert target.facts()["cpu_count"]


def test_remote_target_passes_the_conformance_checks_through_a_real_agent(tmp_path, monkeypatch):
    """autocomp.testing.check_target with the options a user gives: a tiny model measured on the
    agent, facts from the device, and a file that is not a model refused as a CandidateError."""
    from autocomp.testing import check_target

    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    server, thread = _start(max_upload_bytes=1 << 20)  # the tiny ResNet-20 is 79 kB
    try:
        report = check_target(RemoteTarget(), {"agent": server.url}, work_dir=tmp_path)
        assert not report.failures and report.passed == 11
        _assert_alive(server.url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_remote_target_is_registered_by_the_plugin_hook():
    from autocomp.plugins import load_registry
    from autocomp_plugins import remote_target

    registry = load_registry(entry_points=[], extra_plugins=[("remote", remote_target)])
    target = registry.target("remote")
    assert isinstance(target, RemoteTarget) and target.measured and target.facts() == {}


def test_remote_target_built_directly_uses_its_policy(agent, tmp_path):
    policy = TimingPolicy(warmup_runs=1, warmup_s=0.0, min_runs=7, min_s=0.0, max_runs=7)
    stats = RemoteTarget(agent.url, TOKEN, policy=policy).latency(tiny_model(tmp_path / "m.onnx", seed=7), SHAPES)
    assert stats.runs == 7 and stats.measured


def test_remote_target_reads_token_file(agent, tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV_VAR, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    target = RemoteTarget().configure({"agent": agent.url, "token_file": str(token_file)})
    assert target.facts()["agent_url"] == agent.url


def test_remote_target_with_wrong_token_raises_target_error(agent, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV_VAR, "not-the-token")
    target = RemoteTarget().configure({"agent": agent.url})
    with pytest.raises(TargetError, match=f"check that {TOKEN_ENV_VAR}"):
        target.latency(tiny_model(tmp_path / "m.onnx"), SHAPES)


def test_remote_target_validates_options(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    with pytest.raises(TargetError, match="needs the agent's URL"):
        RemoteTarget().configure({})
    with pytest.raises(TargetError, match=r"\['token'\]"):
        RemoteTarget().configure({"agent": "http://127.0.0.1:1", "token": TOKEN})
    with pytest.raises(TargetError, match="http://HOST:PORT"):
        RemoteTarget().configure({"agent": "jetson.local:8765"})
    monkeypatch.delenv(TOKEN_ENV_VAR)
    with pytest.raises(ConfigError, match=TOKEN_ENV_VAR):
        RemoteTarget().configure({"agent": "http://127.0.0.1:1"})


def test_unreachable_agent_raises_infrastructure_error(tmp_path, monkeypatch):
    server, thread = _start()
    url = server.url  # a port that was free a moment ago and is closed now
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    target = RemoteTarget().configure({"agent": url})
    with pytest.raises(InfrastructureError, match=rf"cannot reach the autocomp agent at {url}.*autocomp agent serve"):
        target.latency(tiny_model(tmp_path / "m.onnx"), SHAPES)
