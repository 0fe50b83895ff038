"""Helpers shared by the tests (not a test module itself)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = [str(REPO / "client"), str(REPO / "daemon")]

# The tests test this checkout, installed (`pip install -e .`) or not, and so do their children.
for _d in reversed(SOURCE_DIRS):
    if _d not in sys.path:
        sys.path.insert(0, _d)

from hotweights.testing import stop_process  # noqa: E402,F401 (the tests' helpers share the package's)


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python process that imports this checkout's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_DIRS + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env
