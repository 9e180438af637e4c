"""The run directory: manifest, per-trial artifacts, pareto.json; every file written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "write_json", "write_text", "read_json", "relocate", "sha256_of", "reported_latency_ms"]


def reported_latency_ms(record: dict[str, Any], p50: bool = False) -> float:
    """A baseline or Pareto record's latency as reported: the side-by-side re-measurement at the end
    of the search (``final_latency_ms``) where there is one, else the search's own figure; with
    ``p50``, the p50 of the same measurements. Records from before ``latency_ms`` was kept give their
    p50; a key present with a None value counts as missing."""
    keys = (("final_latency_p50_ms", "latency_p50_ms") if p50
            else ("final_latency_ms", "latency_ms", "latency_p50_ms"))
    return next(record[k] for k in keys if record.get(k) is not None)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file in the same folder, rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, rename), readable
    as the umask allows, like any file the process creates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is its owner's alone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def relocate(summary: dict[str, Any], root: Path) -> None:
    """Point a run summary (``pareto.json``) read from ``root`` at where its run lies now: its
    ``run_dir``, and the artifacts of its base model and members that were written under the run
    directory as it was then (a run moved or copied whole). Other paths are left as written."""
    recorded = summary.get("run_dir")
    for record in [summary.get("baseline"), *(summary.get("pareto") or [])]:
        if isinstance(record, dict) and isinstance(record.get("artifact"), str) and isinstance(recorded, str):
            try:
                record["artifact"] = str(root / Path(record["artifact"]).relative_to(recorded))
            except ValueError:  # not under it
                pass
    summary["run_dir"] = str(root)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RunDir:
    """Paths and writers of one run directory (see DESIGN.md, "The run directory")."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def pareto(self) -> Path:
        return self.root / "pareto.json"

    @property
    def baseline_dir(self) -> Path:
        return self.root / "baseline"

    def trial_dir(self, number: int) -> Path:
        return self.root / "trials" / f"{number:04d}"

    def exists(self) -> bool:
        return self.manifest.exists()

    def write_manifest(self, data: dict[str, Any]) -> None:
        write_json(self.manifest, data)

    def read_manifest(self) -> dict[str, Any]:
        return read_json(self.manifest)

    def read_manifest_if_any(self) -> dict[str, Any]:
        """The manifest, or an empty one where it is missing or unreadable (a report or a model
        card only shows what it holds)."""
        try:
            manifest = self.read_manifest()
        except (OSError, ValueError):
            return {}
        return manifest if isinstance(manifest, dict) else {}

    def update_manifest(self, **changes: Any) -> None:
        data = self.read_manifest()
        data.update(changes)
        self.write_manifest(data)
