"""A version whose read broke after admission (FAILED), seen by the core without a daemon."""

from __future__ import annotations

import pytest

from hotweights import errors
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.swap import swap
from support.ckpt_tools import versioned_model


def test_alias_to_failed_version_is_refused(tmp_path):
    """A FAILED version cannot become an alias target, by alias or by swap."""
    m = ModelManager(CpuBackend(memory_limit=64 * 2**20))
    try:
        m.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
        path = versioned_model(tmp_path, 2)
        mv, run = m.begin_load("llm", str(path), version="v2")
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(errors.BadCheckpoint):
            run()
        with pytest.raises(errors.FailedPrecondition, match="llm@v2: it is FAILED"):
            m.set_alias("prod", "llm@v2")
        with pytest.raises(errors.FailedPrecondition, match="FAILED"):
            swap(m, "prod", "llm@v2")
        assert m.aliases() == {"prod": "llm@v1"}
    finally:
        m.close()
