"""Latency lookups shared by the search and ``autocomp latency``: a cache keyed by the model graph and
the target, and a wrapper that measures a named device through its agent.

The cache key is the SHA-256 of the ONNX graph (initializers included, metadata and doc strings
excluded), the input shapes and the target's identity (its name and the facts that change timings:
thread count, runtime version, CPU model). An identical candidate is never measured twice in a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from autocomp.target import LatencyStats, Target

__all__ = ["graph_hash", "LatencyCache", "MeasuredThroughAgent", "target_identity", "interleaved"]

T = TypeVar("T")
R = TypeVar("R")


def interleaved(items: Sequence[T], measure: Callable[[T], R], rounds: int, rng: Any = None) -> list[list[R]]:
    """``measure`` every item once per round, round after round, so all items see the same machine
    load; with ``rng`` (a :class:`random.Random`) each round goes in a new shuffled order. Returns,
    per item, its ``rounds`` results in round order. Used wherever models are compared side by side:
    the search's final re-measurement and the benchmarks."""
    results: list[list[R]] = [[] for _ in items]
    for _ in range(rounds):
        order = list(range(len(items)))
        if rng is not None:
            rng.shuffle(order)
        for i in order:
            results[i].append(measure(items[i]))
    return results


def graph_hash(onnx_path: Path) -> str:
    """SHA-256 of the model's graph and opsets, independent of producer metadata and doc strings."""
    # a trial asks twice for its artifact when it measures it again; any rewrite changes ctime
    status = os.stat(onnx_path)
    return _graph_hash(str(Path(onnx_path).resolve()), status.st_ino, status.st_size, status.st_mtime_ns,
                       status.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def _graph_hash(path: str, *version: int) -> str:
    import onnx

    model = onnx.load(path, load_external_data=False)
    digest = hashlib.sha256()
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.name = ""
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
    digest.update(graph.SerializeToString(deterministic=True))
    for opset in model.opset_import:
        digest.update(f"{opset.domain}:{opset.version}".encode())
    return digest.hexdigest()


def target_identity(target: Target) -> str:
    facts = target.facts()
    keep = {k: facts[k] for k in sorted(facts) if k in ("threads", "onnxruntime", "cpu_model", "device", "agent", "compute_scale", "overhead_us")}
    return json.dumps({"target": target.name, **keep}, sort_keys=True, default=str)


class LatencyCache:
    """A small SQLite table of measurements: (graph hash, shapes, target identity) -> LatencyStats."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS latency (key TEXT PRIMARY KEY, stats TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    @staticmethod
    def key(graph: str, shapes: Mapping[str, Sequence[int]], identity: str) -> str:
        return json.dumps([graph, {k: list(v) for k, v in sorted(shapes.items())}, identity])

    def get(self, key: str) -> LatencyStats | None:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT stats FROM latency WHERE key = ?", (key,)).fetchone()
        return LatencyStats.from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, stats: LatencyStats) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO latency (key, stats) VALUES (?, ?)", (key, json.dumps(stats.to_dict())))

    def latency(self, target: Target, onnx_path: Path, shapes: Mapping[str, Sequence[int]]) -> tuple[LatencyStats, bool]:
        """The target's latency for ``onnx_path``, from the cache when this graph was seen; (stats, cached)."""
        key = self.key(graph_hash(onnx_path), shapes, target_identity(target))
        cached = self.get(key)
        if cached is not None:
            return cached, True
        stats = target.latency(onnx_path, shapes)
        self.put(key, stats)
        return stats, False

    def recheck(self, target: Target, onnx_path: Path, shapes: Mapping[str, Sequence[int]], first: LatencyStats,
                statistic: str) -> tuple[LatencyStats, LatencyStats]:
        """Measure ``onnx_path`` again, in a window of its own, and keep whichever of ``first`` and the
        new reading is faster on ``statistic``, in the cache too: (kept, second reading).

        Interference on a shared machine only ever adds time, and it can slow a whole window (a
        candidate read 0.30 ms once and 0.21 ms in every later measurement; benchmarks/joint_vs_single.md),
        so the faster of two windows is the better estimate of what the model costs."""
        second = target.latency(onnx_path, shapes)
        key = self.key(graph_hash(onnx_path), shapes, target_identity(target))
        # in one write transaction, so a reading another worker stored meanwhile is weighed too
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT stats FROM latency WHERE key = ?", (key,)).fetchone()
            stored = [LatencyStats.from_dict(json.loads(row[0]))] if row else []
            kept = min([first, second, *stored], key=lambda stats: stats.value(statistic))
            db.execute("INSERT OR REPLACE INTO latency (key, stats) VALUES (?, ?)", (key, json.dumps(kept.to_dict())))
        return kept, second


class MeasuredThroughAgent(Target):
    """A named device target (``--target jetson-orin-nano``) whose latency is measured on the real
    device through its agent (``--agent URL``) instead of predicted. It keeps the device's name and
    precisions; the measurement comes from the agent."""

    measured = True

    def __init__(self, device: Target, remote: Target):
        self._device = device
        self._remote = remote
        self.name = device.name  # type: ignore[misc]
        self.aliases = device.aliases  # type: ignore[misc]
        self.precisions = device.precisions  # type: ignore[misc]
        self.description = f"{device.description} (measured through an agent)"  # type: ignore[misc]

    def latency(self, onnx_path: Path, input_shapes: Mapping[str, Sequence[int]]) -> LatencyStats:
        stats = self._remote.latency(onnx_path, input_shapes)
        return LatencyStats(stats.p50_ms, stats.p90_ms, stats.mean_ms, stats.runs, True, self.name, stats.facts,
                            min_ms=stats.min_ms)

    def facts(self) -> dict[str, Any]:
        return {"device": self._device.name, "agent": getattr(self._remote, "agent_url", None), **self._remote.facts()}
