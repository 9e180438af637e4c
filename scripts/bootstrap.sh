#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv, torch first (the local CPU
# wheel, so pip never resolves a multi-GB CUDA build), then autocomp with its test extras.
# Re-running it does nothing when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python

if ! "$VENV_PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    echo "bootstrap: installing torch==$TORCH_VERSION (CPU)" >&2
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi

# Reinstall the package only when its metadata changed (entry points, dependencies).
STAMP=.venv/.autocomp-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VENV_PY" -c "import autocomp, autocomp_plugins" 2>/dev/null; then
    echo "bootstrap: installing autocomp and its test extras" >&2
    "$VENV_PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    echo "$WANT" > "$STAMP"
fi
