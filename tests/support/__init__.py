"""Helpers shared by the tests (not a test module itself)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
CLIENTS = TESTS / "clients"
SOURCE_DIRS = [str(REPO / "client"), str(REPO / "daemon")]
# A setting of the tests, taken out of the environment every daemon they start inherits: the daemon
# refuses HOTWEIGHTS_* names that are not its keys.
GDS_TEST_DIR = os.environ.pop("HOTWEIGHTS_GDS_TEST_DIR", "")

# The tests test this checkout, installed (`pip install -e .`) or not, and so do their children.
for _d in reversed(SOURCE_DIRS):
    if _d not in sys.path:
        sys.path.insert(0, _d)

from hotweights import testing  # noqa: E402
from hotweights.testing import stop_process, wait_until  # noqa: E402,F401 (the tests share the package's)


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python process that imports this checkout's packages and, for the
    programs in tests/clients/, the tests' own ``support`` package."""
    return testing.child_env(extra, paths=[*SOURCE_DIRS, str(TESTS)])
