"""Correcting a predicted device target from measurements taken through a real agent on loopback."""

from __future__ import annotations

import json

import pytest

from autocomp.calibration import stored_calibration
from autocomp.cli import main
from autocomp.search import resolve_target


@pytest.fixture
def agent(monkeypatch):
    from autocomp.agent.server import AgentConfig, make_server
    from autocomp.ort import TimingPolicy

    token = "calibration-test-token-0123456789"
    monkeypatch.setenv("AUTOCOMP_AGENT_TOKEN", token)
    policy = TimingPolicy(min_runs=5, min_s=0.05, warmup_runs=2, warmup_s=0.0)
    server, _thread = make_server(AgentConfig(token=token, port=0, policy=policy))
    yield server
    server.shutdown()
    server.server_close()


def test_calibrate_stores_a_correction_that_later_searches_use(tmp_path, monkeypatch, registry, agent, capsys):
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path))
    before = resolve_target(registry, "raspberry-pi-4", {}).facts()["compute_scale"]
    code = main(["calibrate", "--target", "raspberry-pi-4", "--agent", agent.url, "--models", "tiny", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # this host is far faster than a Pi 4: the uncorrected predictions are far off, the corrected ones close
    assert report["error_before_pct"] > 50
    assert report["error_after_pct"] < report["error_before_pct"]
    assert len(report["measured_ms"]) == 3 and all(ms > 0 for ms in report["measured_ms"])
    stored = stored_calibration("raspberry-pi-4")
    assert stored["options"] == report["options"]
    after = resolve_target(registry, "raspberry-pi-4", {}).facts()["compute_scale"]
    assert after == pytest.approx(report["options"]["compute_scale"]) and after != pytest.approx(before)


def test_calibrating_a_measured_target_is_a_usage_error(tmp_path, monkeypatch, registry, agent, capsys):
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path))
    assert main(["calibrate", "--target", "remote", "--agent", agent.url, "--models", "tiny"]) == 2
    assert "is measured, not predicted" in capsys.readouterr().err


def test_calibrating_a_predicted_target_without_an_agent_is_a_usage_error(registry, capsys):
    assert main(["calibrate", "--target", "jetson"]) == 2
    assert "pass --agent URL" in " ".join(capsys.readouterr().err.split())
