"""One exception hierarchy, rooted in :class:`AutocompError`.

The library raises; only :mod:`autocomp.cli` turns an error into a message and an exit code.
Each class carries the exit code the CLI uses for it (see DESIGN.md, "CLI and exit codes").
"""

from __future__ import annotations

__all__ = [
    "AutocompError",
    "ConfigError",
    "SpaceError",
    "PluginError",
    "WorkloadError",
    "TargetError",
    "ExportError",
    "CandidateError",
    "InfrastructureError",
    "Interrupted",
]


class AutocompError(Exception):
    """Base of every error autocomp raises on purpose."""

    exit_code = 4


class ConfigError(AutocompError):
    """Usage or configuration error: the user can fix it by changing the command or a file."""

    exit_code = 2


class SpaceError(ConfigError):
    """A search-space file is malformed, names an unknown method or key, or holds a bad value."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        where = ""
        if source:
            where += f"{source}: "
        if key:
            where += f"[{key}] "
        super().__init__(where + message)
        self.message = message
        self.source = source
        self.key = key


class PluginError(ConfigError):
    """Plugins conflict (duplicate names) or a requested plugin does not exist."""


class WorkloadError(ConfigError):
    """A workload cannot be found, imported, or does not return a valid Workload."""


class TargetError(ConfigError):
    """Unknown target, or a target that cannot be used as configured."""


class ExportError(AutocompError):
    """A model cannot be exported to ONNX, or its export disagrees with torch."""

    exit_code = 2


class CandidateError(AutocompError):
    """One candidate could not be built or evaluated; the trial fails and the search goes on."""


class InfrastructureError(AutocompError):
    """Storage, file system or device failure that is not the user's input."""

    exit_code = 4


class Interrupted(AutocompError):
    """The run was interrupted (Ctrl-C, SIGTERM); what was computed is kept and the run can resume.
    ``summary`` is the run's summary as written to its ``pareto.json`` (None when stopped before
    its first trial)."""

    exit_code = 3

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary
