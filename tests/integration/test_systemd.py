"""hotweightsd.persist.systemd and hotweightsd.persist.statefile against an emulated service manager.

The service side runs in child Python processes started by tests/support/svcmgr.py, as systemd
would start the daemon; what the manager received is checked here.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from hotweights.errors import InvalidArgument
from hotweights.testing import wait_until
from hotweightsd.persist import systemd
from support import CLIENTS
from support.sdenv import no_service_manager  # noqa: F401 (autouse fixture)
from support.svcmgr import ServiceManager


@pytest.fixture
def mgr(tmp_path):
    with ServiceManager(tmp_path) as m:
        yield m


def service(mode: str, *args: str) -> list[str]:
    """tests/clients/sd_service.py in MODE: the service side, in its own process."""
    return [sys.executable, str(CLIENTS / "sd_service.py"), mode, *args]


def finished(m: ServiceManager, timeout: float = 60.0) -> int:
    rc = m.process.wait(timeout)
    assert rc == 0, f"service exited with {rc}:\n{m.output()}"
    return rc


# -- notify ----------------------------------------------------------------------------------


def test_ready_status_watchdog_stopping_arrive_in_order(tmp_path):
    # A 1 s interval: the loop pings every half interval; three pings are waited for, then the
    # service is told to stop.
    with ServiceManager(tmp_path, watchdog_usec=1_000_000) as m:
        proc = m.start(service("notify", "1.0"))
        ready = m.wait_for("READY", "1")
        wait_until(lambda: sum("WATCHDOG" in msg.fields for msg in m.messages) >= 3, what="three watchdog pings")
        proc.send_signal(signal.SIGUSR1)
        m.wait_for("STOPPING", "1")
        finished(m)
        msgs = m.messages
    assert ready.fields == {"READY": "1", "STATUS": "serving 0 models"}
    assert all(msg.pid == proc.pid for msg in msgs), [msg.pid for msg in msgs]
    kinds = [next(iter(msg.fields)) for msg in msgs]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING", kinds
    # A multi-line status is one STATUS= line, not a stray field.
    assert msgs[1].fields == {"STATUS": "loading llama"}
    assert kinds.count("WATCHDOG") >= 3, kinds
    assert not m.errors


def test_abstract_notify_socket(tmp_path, monkeypatch):
    with ServiceManager(tmp_path, abstract=True, notify_access="all") as m:
        assert m.notify_socket.startswith("@")
        monkeypatch.setenv("NOTIFY_SOCKET", m.notify_socket)
        assert systemd.ready("up")
        msg = m.wait_for("READY", "1")
    assert msg.fields["STATUS"] == "up" and msg.pid == os.getpid()


# -- the fd store ----------------------------------------------------------------------------


def test_fdstore_round_trip_across_sigkill(mgr, tmp_path):
    sent, got = tmp_path / "sent.json", tmp_path / "got.json"
    first = mgr.start(service("store-two", str(sent)))
    mgr.wait_for("READY", "1")
    stored = mgr.wait_for("FDSTORE", "1")
    assert stored.fields == {"FDSTORE": "1", "FDNAME": "model-a.r0", "FDPOLL": "0"}
    assert list(mgr.stored_fds) == ["model-a.r0", "model-b.r1"]
    assert mgr.stop(signal.SIGKILL) == -signal.SIGKILL

    second = mgr.restart(service("read-back", str(got)))
    finished(mgr)
    out = json.loads(got.read_text())
    assert out["before"] == {
        "LISTEN_PID": str(second.pid),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "model-a.r0:model-b.r1",
    }
    assert second.pid != first.pid
    assert out["fds"] == {"model-a.r0": [3], "model-b.r1": [4]}
    assert out["data"] == json.loads(sent.read_text())
    assert out["after"] == [] and all(out["cloexec"])
    assert list(mgr.stored_fds) == ["model-a.r0", "model-b.r1"]  # passing back keeps them stored
    assert not mgr.errors


def test_fdstore_remove_and_many_fds_under_one_name(tmp_path, monkeypatch):
    with ServiceManager(tmp_path, notify_access="all") as m:
        monkeypatch.setenv("NOTIFY_SOCKET", m.notify_socket)
        fds = [os.memfd_create("part") for _ in range(300)]
        try:
            assert systemd.store_fds("big", fds)
            assert systemd.store_fds("gone", [fds[0]])
            assert systemd.remove_fds("gone")
            assert systemd.ready()
            m.wait_for("READY", "1")
        finally:
            for fd in fds:
                os.close(fd)
        # 300 fds do not fit one datagram (SCM_MAX_FD 253): two messages, one name.
        assert [msg.nfds for msg in m.messages if msg.fields.get("FDNAME") == "big"] == [253, 47]
        assert {k: len(v) for k, v in m.stored_fds.items()} == {"big": 300}
        assert not m.errors


def test_listen_fds_names_a_closed_fd(mgr):
    # The manager passes one fd (at 3); the environment claims a second one at 4.
    fd = os.memfd_create("a")
    mgr.put("a", fd)
    os.close(fd)
    mgr.start(service("claim-extra-fd"))
    finished(mgr)
    assert "InvalidArgument LISTEN_FDS says fd 4 ('b') was passed, but it is not open" in mgr.output()


def test_in_process_notify_reaches_the_manager(tmp_path, monkeypatch):
    with ServiceManager(tmp_path, notify_access="all", fdstore_max=2) as m:
        monkeypatch.setenv("NOTIFY_SOCKET", m.notify_socket)
        fds = [os.memfd_create("x") for _ in range(3)]
        try:
            assert systemd.store_fds("three", fds)
            assert systemd.watchdog()
            m.wait_for("WATCHDOG", "1")
        finally:
            for fd in fds:
                os.close(fd)
        assert len(m.stored_fds["three"]) == 2
        assert any("fd store full" in e for e in m.errors), m.errors
        with pytest.raises(InvalidArgument, match="not an open file descriptor"):
            systemd.store_fds("closed", [os.sysconf("SC_OPEN_MAX") + 1])


# -- the state file --------------------------------------------------------------------------


def test_restart_with_a_state_file_that_disagrees_with_the_fds(mgr, tmp_path):
    """The daemon's restart path: the store lost one allocation, the state file still lists it."""
    state = tmp_path / "state.json"
    mgr.start(service("store-with-state", str(state)))
    mgr.wait_for("READY", "1")
    mgr.stop(signal.SIGKILL)
    mgr.remove("m@1.r1")
    mgr.restart(service("check-state", str(state)))
    finished(mgr)
    assert "mismatch: 1 name(s) in the state file got no fd back: 'm@1.r1'" in mgr.output(), mgr.output()


def test_emulator_binds_a_notify_socket_for_a_long_tmp_path(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with ServiceManager(deep, notify_access="all") as m:
        monkeypatch.setenv("NOTIFY_SOCKET", m.notify_socket)
        assert systemd.ready()
        m.wait_for("READY", "1")
        short = os.path.dirname(m.notify_socket)
    assert not os.path.exists(short)
