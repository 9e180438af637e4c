"""Shared fixtures. Tests never load whatever plugins happen to be installed: the built-in plugin
modules are registered directly, and test plugins are added per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUILTIN_PLUGINS = ("remove_blocks", "prune", "lowrank", "distill", "quantize", "cpu_target", "digits", "edge", "remote_target")


def unmeasured_target(name: str = "device", precisions=("fp32",), aliases=()):
    """A target that declares its precisions but is never timed (tests of spaces, methods, plugins)."""
    from autocomp.target import Target

    def latency(self, onnx_path, input_shapes):
        raise AssertionError("latency is never measured in these tests")

    attrs = {"name": name, "precisions": frozenset(precisions), "aliases": tuple(aliases), "latency": latency}
    return type(f"Unmeasured[{name}]", (Target,), attrs)()


def signal_before(monkeypatch, owner, name, calls=(1,), when=None):
    """Make ``owner.name`` raise SIGTERM on itself before its calls numbered in ``calls`` (from 1),
    counting only the calls ``when(*args, **kwargs)`` accepts when given: a stop landing exactly there."""
    import signal

    original, seen = getattr(owner, name), []

    def under_a_signal(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            seen.append(1)
            if len(seen) in calls:
                signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, under_a_signal)


def builtin_plugins():
    import importlib

    return [(name, importlib.import_module(f"autocomp_plugins.{name}")) for name in BUILTIN_PLUGINS]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Trained test models are cached per test session, never in the user's cache."""
    path = os.environ.get("AUTOCOMP_TEST_CACHE") or str(tmp_path_factory.mktemp("autocomp-cache"))
    old = os.environ.get("AUTOCOMP_CACHE_DIR")
    os.environ["AUTOCOMP_CACHE_DIR"] = path
    yield Path(path)
    if old is None:
        os.environ.pop("AUTOCOMP_CACHE_DIR", None)
    else:
        os.environ["AUTOCOMP_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def registry():
    """A registry of the built-in plugins only, installed as the process-wide one for the test."""
    from autocomp.plugins import load_registry, reset_registry

    reg = load_registry(entry_points=[], extra_plugins=builtin_plugins())
    reset_registry(reg)
    yield reg
    reset_registry(None)


@pytest.fixture(scope="session")
def tiny_workload(_cache_dir, torch_threads):
    from autocomp_plugins.digits import tiny_digits_workload

    return tiny_digits_workload()


FAST_TIMING = {"min_s": 0.02, "min_runs": 5}


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server listening on a Unix socket only, for the whole session; yields a
    function that creates a fresh database and returns its SQLAlchemy URL. Run as the ``postgres``
    user when the tests run as root (initdb refuses root)."""
    import glob
    import shutil
    import subprocess
    import tempfile

    pytest.importorskip("psycopg")  # the test extras install it
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server installed (Debian: apt install postgresql)")
    bindir = Path(found[-1]).parent
    # short and reachable by the postgres user: a Unix socket path has about 100 bytes
    root = Path(tempfile.mkdtemp(prefix="autocomp-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres user to run the PostgreSQL server as (initdb refuses root)")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", 5439  # no TCP: the socket lies in root, so the port clashes with nothing
    ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True, text=True)
        subprocess.run([*ctl, "-w", "-l", str(root / "server.log"), "-o",
                        f"-k {root} -p {port} -c listen_addresses='' -c fsync=off", "start"], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        log = root / "server.log"
        detail = exc.stderr + (log.read_text() if log.exists() else "")
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"the throwaway PostgreSQL server did not start: {detail}") from exc
    made = []

    def database(name: str) -> str:
        import psycopg

        with psycopg.connect(host=str(root), port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql+psycopg://postgres@/{name}?host={root}&port={port}"

    try:
        yield database
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
