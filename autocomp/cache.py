"""Where autocomp keeps what it can recompute: trained built-in models, host calibrations."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """``$AUTOCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/autocomp``, else ``~/.cache/autocomp``, joined
    with ``parts``. Read at call time, never at import."""
    root = os.environ.get("AUTOCOMP_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "autocomp"
    return base.joinpath(*parts)
