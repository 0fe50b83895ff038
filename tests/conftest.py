"""Fixtures that start real daemons on real unix sockets (hotweights.testing, through support/daemons.py).

Every process the harness starts is tracked: whatever a test leaves running is killed when the test
ends, and a test that passed but left a daemon running errors, naming it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hotweights import testing
from support.daemons import short_tmpdir, start_daemon

# No test reads the node's /etc/hotweights/config.toml: every daemon a test starts inherits this.
os.environ["HOTWEIGHTS_CONFIG"] = "none"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_call_failed] = report.failed
    return report


_call_failed = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    before = set(testing.tracked())
    yield
    killed = testing.kill_leftovers([pid for pid in testing.tracked() if pid not in before])
    leaked = [f"{what} (pid {pid})" for pid, what in killed.items() if what.startswith(("daemon", "service"))]
    if leaked and not request.node.stash.get(_call_failed, False):
        pytest.fail(f"the test left running (now killed): {', '.join(leaked)}", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    killed = testing.kill_leftovers()
    if killed:
        left = ", ".join(f"{what} (pid {pid})" for pid, what in killed.items())
        session.config.get_terminal_writer().line(f"killed processes left running: {left}", red=True)


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def svc():
    """An emulated service manager (notify socket, fd store) in a short temporary directory."""
    from support.svcmgr import ServiceManager

    d = short_tmpdir()
    with ServiceManager(d) as mgr:
        yield mgr
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(sockdir):
    d = start_daemon(str(sockdir / "hw.sock"))
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, f"daemon exited with {code}:\n{d.logs()}"


@pytest.fixture
def client(daemon):
    import hotweights

    c = hotweights.connect(daemon.socket)
    try:
        yield c
    finally:
        c.close()
