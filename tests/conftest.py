"""Fixtures that start real daemons on real unix sockets (helpers in support/daemons.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from support.daemons import short_tmpdir, start_daemon

# No test reads the node's /etc/hotweights/config.toml: every daemon a test starts inherits this.
os.environ["HOTWEIGHTS_CONFIG"] = "none"


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(sockdir):
    d = start_daemon(str(sockdir / "hw.sock"))
    yield d
    code = d.stop()
    assert code == 0, f"daemon exited with {code}:\n{d.logs()}"


@pytest.fixture
def client(daemon):
    import hotweights

    c = hotweights.connect(daemon.socket)
    yield c
    c.close()
