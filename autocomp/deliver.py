"""Hand one Pareto member of a finished run over for deployment (``autocomp export``).

A nightly job that has just refreshed a model wants one file to ship, picked by a rule it states
(the fastest member within half a point, the most accurate under 2 ms), not a path fished out of
``pareto.json``. :func:`select_member` applies the rule; :func:`export_member` copies the member's
ONNX file after checking it is byte for byte the file whose figures the run recorded (SHA-256),
and writes beside it a model card: where it came from, the setting that built it, and the figures
measured on that very file.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autocomp.compare import SPLITS
from autocomp.errors import AutocompError, ConfigError, InfrastructureError
from autocomp.results import RunDir, reported_latency_ms, sha256_of, write_json

__all__ = ["PREFER", "NoMemberError", "select_member", "export_member"]

#: How a member is chosen among those within the bounds.
PREFER = ("fastest", "most-accurate")
#: A member whose drop is the bound give or take float rounding (0.99 - 0.98 > 0.01) is within it.
DROP_TOLERANCE = 1e-9


class NoMemberError(AutocompError):
    """No Pareto member of the run meets the bounds asked for (exit 1, as a search that found none)."""

    exit_code = 1


def select_member(summary: dict[str, Any], *, trial: int | None = None, max_drop: float | None = None,
                  max_latency_ms: float | None = None, prefer: str | None = None,
                  split: str | None = None) -> dict[str, Any]:
    """The Pareto member of ``summary`` (a finished run's ``pareto.json``) to export.

    ``trial`` names one (a trial listed in a member's ``same_as`` names that member). Otherwise the
    members that drop at most ``max_drop`` of the metric below the base model's on ``split``
    (absolute, whatever drop the search was bounded by; default the validation split) and whose
    reported latency is at most ``max_latency_ms`` are kept, and of those the fastest (ties: the more
    accurate) or, with ``prefer="most-accurate"``, the most accurate (ties: the faster). Raises
    :class:`ConfigError` for a bad rule or a trial that is not a member, :class:`NoMemberError` when
    no member is within the bounds."""
    members = summary["pareto"]
    run = summary.get("run_dir")
    if trial is not None:
        rule = [name for name, value in (("--max-drop", max_drop), ("--max-latency", max_latency_ms),
                                         ("--prefer", prefer), ("--split", split)) if value is not None]
        if rule:
            raise ConfigError(f"--trial names its member itself: give --trial or a rule ({', '.join(rule)}), not both")
        for member in members:
            if trial == member["trial"] or trial in member.get("same_as", []):
                return member
        listed = ", ".join(str(m["trial"]) for m in members) or "none: nothing met the search's constraints"
        raise ConfigError(f"trial {trial} is not a Pareto member of {run} (members: {listed}); only members were "
                          "kept and re-measured")
    prefer, split = prefer or PREFER[0], split or "validation"
    if prefer not in PREFER:
        raise ConfigError(f"prefer must be one of {', '.join(PREFER)}, got {prefer!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if max_drop is not None and not max_drop >= 0:
        raise ConfigError(f"--max-drop must be >= 0 (absolute, in the metric's units), got {max_drop!r}")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise ConfigError(f"--max-latency must be > 0 ms, got {max_latency_ms!r}")
    if not members:
        raise NoMemberError(f"{run} has no Pareto member: nothing met its search's constraints. Loosen them, or search "
                            "with more --trials")
    key = SPLITS[split]
    missing = [m["trial"] for m in members if m.get(key) is None]
    if missing or summary["baseline"].get(key) is None:
        who = f"Pareto member(s) {missing} have" if missing else "the base model has"
        raise ConfigError(f"{run}: {who} no {split} metric (the workload has no test split, or scoring on it "
                          "failed); choose on --split validation")

    def drop(m: dict[str, Any]) -> float:
        return summary["baseline"][key] - m[key]

    within = [m for m in members
              if (max_drop is None or drop(m) <= max_drop + DROP_TOLERANCE)
              and (max_latency_ms is None or reported_latency_ms(m) <= max_latency_ms)]
    if not within:
        fastest = min(members, key=reported_latency_ms)
        best = max(members, key=lambda m: m[key])
        bounds = " and ".join(b for b in (
            None if max_drop is None else f"a {split} drop of at most {_points(max_drop)}",
            None if max_latency_ms is None else f"a latency of at most {max_latency_ms:g} ms") if b)
        raise NoMemberError(
            f"no Pareto member of {run} has {bounds}; its fastest member, trial {fastest['trial']}, drops "
            f"{_points(drop(fastest))} at {reported_latency_ms(fastest):.3f} ms, its most accurate, trial "
            f"{best['trial']}, drops {_points(drop(best))} at {reported_latency_ms(best):.3f} ms. Loosen the "
            "bounds, or search again with more --trials")
    if prefer == "fastest":
        return min(within, key=lambda m: (reported_latency_ms(m), -m[key], m["trial"]))
    return max(within, key=lambda m: (m[key], -reported_latency_ms(m), -m["trial"]))


def _points(drop: float) -> str:
    return f"{100 * drop:.2f} pts"


def export_member(summary: dict[str, Any], member: dict[str, Any], to: Path,
                  selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy ``member``'s ONNX file to ``to`` and write its model card beside it; return the card.

    ``to`` is the ONNX file to write, or an existing directory to write ``model.onnx`` into; the
    card is the same path with ``.json`` for its suffix. Both are written to temporary files first
    and renamed into place once the copy is checked, so an existing pair (a nightly job ships to
    the same path) is replaced only by a good one. Raises :class:`ConfigError` for a ``to`` that is
    neither, :class:`InfrastructureError` when the member's file is missing or is not the file the
    run recorded (its SHA-256 differs): its figures would not be its own. ``selection`` (the rule
    that chose it) goes into the card."""
    to = Path(to)
    if to.is_dir():
        to = to / "model.onnx"
    elif to.suffix != ".onnx":
        raise ConfigError(f"--to {to}: give an ONNX file name ending in .onnx, or an existing directory")
    source = Path(member["artifact"])
    if not source.is_file():
        raise InfrastructureError(f"trial {member['trial']}'s ONNX file {source} is missing: the run directory was "
                                  "moved in part or cleaned; nothing exported")
    digest = sha256_of(source)
    if digest != member["sha256"]:
        raise InfrastructureError(f"{source} is not the file the run measured (SHA-256 {digest[:12]}..., recorded "
                                  f"{member['sha256'][:12]}...): its recorded figures are not its own; nothing "
                                  "exported")
    card_path = to.with_suffix(".json")
    manifest = RunDir(Path(summary["run_dir"])).read_manifest_if_any()
    base = summary["baseline"]
    card = {
        "model": str(to.resolve()),
        "sha256": digest,
        "source": {"run_dir": str(Path(summary["run_dir"]).resolve()), "trial": member["trial"],
                   "same_as": member.get("same_as", []), "artifact": str(source.resolve()),
                   "run_started": manifest.get("started"), "command": manifest.get("command")},
        "selection": selection or {"trial": member["trial"]},
        "workload": summary.get("workload"),
        "metric_name": summary.get("metric_name"),
        "target": summary.get("target"),
        "latency_statistic": summary.get("latency_statistic"),
        # drop and test_drop as the search recorded them: a fraction of the base metric when
        # constraints.relative_drop is true
        "constraints": summary.get("constraints"),
        **{key: member.get(key) for key in ("metric", "drop", "test_metric", "test_drop")},
        "latency_ms": reported_latency_ms(member),
        "latency_p50_ms": reported_latency_ms(member, p50=True),
        "speedup": member.get("final_speedup", member.get("speedup")),
        **{key: member.get(key) for key in ("size_bytes", "macs", "params")},
        "baseline": {"metric": base.get("metric"), "test_metric": base.get("test_metric"),
                     "latency_ms": reported_latency_ms(base),
                     **{key: base.get(key) for key in ("size_bytes", "macs", "params")}},
        "spec": member.get("spec"),
        "notes": member.get("notes", {}),
        "skipped": member.get("skipped", []),
        "versions": manifest.get("versions"),
        "exported": datetime.now(timezone.utc).isoformat(),
    }
    to.parent.mkdir(parents=True, exist_ok=True)
    model_tmp, card_tmp = to.with_name(f".{to.name}.tmp"), card_path.with_name(f".{card_path.name}.tmp")
    try:
        shutil.copyfile(source, model_tmp)
        if sha256_of(model_tmp) != digest:  # a copy cut short (a full disk) is never shipped as the model
            raise InfrastructureError(f"the copy of {source} at {model_tmp} differs from it; nothing exported")
        write_json(card_tmp, card)
        os.replace(model_tmp, to)
        os.replace(card_tmp, card_path)
    finally:
        model_tmp.unlink(missing_ok=True)
        card_tmp.unlink(missing_ok=True)
    return card
