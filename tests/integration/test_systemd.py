"""hotweightsd.persist.systemd and hotweightsd.persist.statefile against an emulated service manager.

The service side runs in child Python processes started by tests/support/svcmgr.py, as systemd
would start the daemon; what the manager received is checked here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest

from hotweights.errors import ChecksumMismatch, DataLoss, InvalidArgument, Unavailable
from hotweightsd.persist import statefile, systemd
from support.svcmgr import ServiceManager

SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "FDSTORE",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


@pytest.fixture(autouse=True)
def no_service_manager(monkeypatch):
    """Every test starts outside any service manager, whatever runs pytest."""
    for key in SYSTEMD_ENV:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def mgr(tmp_path):
    with ServiceManager(tmp_path) as m:
        yield m


def service(code: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import os, sys, json, asyncio, signal\nfrom hotweightsd.persist import systemd, statefile\n" + code,
    ]


def finished(m: ServiceManager, timeout: float = 10.0) -> int:
    rc = m.process.wait(timeout)
    assert rc == 0, f"service exited with {rc}:\n{m.output()}"
    return rc


# -- notify ----------------------------------------------------------------------------------


def test_ready_status_watchdog_stopping_arrive_in_order(tmp_path):
    code = """
assert systemd.watchdog_interval() == 0.2, systemd.watchdog_interval()
assert systemd.ready("serving 0 models")
assert systemd.status("loading\\nllama")
async def main():
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.watchdog_loop(stop))
    await asyncio.sleep(0.35)
    stop.set()
    await asyncio.wait_for(task, 1)
asyncio.run(main())
assert systemd.stopping()
"""
    with ServiceManager(tmp_path, watchdog_usec=200_000) as m:
        proc = m.start(service(code))
        ready = m.wait_for("READY", "1")
        m.wait_for("STOPPING", "1")
        finished(m)
        msgs = m.messages
    assert ready.fields == {"READY": "1", "STATUS": "serving 0 models"}
    assert all(msg.pid == proc.pid for msg in msgs), [msg.pid for msg in msgs]
    kinds = [next(iter(msg.fields)) for msg in msgs]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING", kinds
    # A multi-line status is one STATUS= line, not a stray field.
    assert msgs[1].fields == {"STATUS": "loading llama"}
    # Half the 0.2 s interval over 0.35 s pings about 4 times; a full-interval loop only twice.
    assert kinds.count("WATCHDOG") >= 3, kinds
    assert not m.errors


def test_abstract_notify_socket(tmp_path, monkeypatch):
    with ServiceManager(tmp_path, abstract=True, notify_access="all") as m:
        assert m.notify_socket.startswith("@")
        monkeypatch.setenv("NOTIFY_SOCKET", m.notify_socket)
        assert systemd.ready("up")
        msg = m.wait_for("READY", "1")
    assert msg.fields["STATUS"] == "up" and msg.pid == os.getpid()


def test_not_under_a_service_manager_everything_is_a_no_op(tmp_path):
    fd = os.memfd_create("x")
    try:
        assert systemd.notify("READY=1") is False
        assert systemd.ready("x") is False and systemd.stopping() is False
        assert systemd.watchdog() is False and systemd.status("x") is False
        assert systemd.store_fds("model", [fd]) is False
        assert systemd.remove_fds("model") is False
        assert systemd.fdstore_enabled() is False
        assert systemd.watchdog_interval() is None
        assert systemd.listen_fds() == {}
        asyncio.run(asyncio.wait_for(systemd.watchdog_loop(asyncio.Event()), 1))
    finally:
        os.close(fd)


def test_notify_rejects_bad_fields_and_bad_sockets(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    for bad in ("READY", "=1", "STATUS=a\nREADY=1"):
        with pytest.raises(InvalidArgument, match="KEY=VALUE"):
            systemd.notify(bad)
    with pytest.raises(Unavailable, match="nobody-listens.sock"):
        systemd.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    with pytest.raises(InvalidArgument, match="neither an absolute path nor an abstract"):
        systemd.ready()


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", "caf\u00e9", "x" * 256, "nl\n"])
def test_fd_names_systemd_would_refuse_are_refused_here(name):
    with pytest.raises(InvalidArgument, match="fd store name"):
        systemd.store_fds(name, [0])
    with pytest.raises(InvalidArgument, match="fd store name"):
        systemd.remove_fds(name)


def test_fdstore_enabled_follows_FDSTORE(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "s"))
    for value, enabled in (("4096", True), ("1", True), ("0", False), ("", False), ("many", False)):
        monkeypatch.setenv("FDSTORE", value)
        assert systemd.fdstore_enabled() is enabled, value
    monkeypatch.delenv("FDSTORE")
    assert systemd.fdstore_enabled() is False  # systemd < 254 or no FileDescriptorStoreMax


def test_watchdog_interval_only_for_the_watched_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        with pytest.raises(InvalidArgument, match="WATCHDOG_USEC"):
            systemd.watchdog_interval()


# -- the fd store ----------------------------------------------------------------------------

STORE_TWO = """
blobs = {}
for name, data in (("model-a.r0", b"weights of a" * 1000), ("model-b.r1", os.urandom(5000))):
    fd = os.memfd_create(name)
    os.write(fd, data)
    assert systemd.store_fds(name, [fd])
    blobs[name] = data.hex()
open(sys.argv[1], "w").write(json.dumps(blobs))
systemd.ready()
signal.pause()
"""

READ_BACK = """
before = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
fds = systemd.listen_fds()
out = {"before": before, "fds": fds,
       "after": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
       "cloexec": [not os.get_inheritable(fd) for fd_list in fds.values() for fd in fd_list],
       "data": {name: os.pread(f[0], 1 << 20, 0).hex() for name, f in fds.items()}}
open(sys.argv[1], "w").write(json.dumps(out))
"""


def test_fdstore_round_trip_across_sigkill(mgr, tmp_path):
    sent, got = tmp_path / "sent.json", tmp_path / "got.json"
    first = mgr.start(service(STORE_TWO) + [str(sent)])
    mgr.wait_for("READY", "1")
    stored = mgr.wait_for("FDSTORE", "1")
    assert stored.fields == {"FDSTORE": "1", "FDNAME": "model-a.r0", "FDPOLL": "0"}
    assert list(mgr.stored_fds) == ["model-a.r0", "model-b.r1"]
    assert mgr.stop(signal.SIGKILL) == -signal.SIGKILL

    second = mgr.restart(service(READ_BACK) + [str(got)])
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


def test_listen_fds_ignores_another_pids_fds(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd.listen_fds() == {}
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize(
    "count,names,problem",
    [
        ("2", "a", "names 1 fds but LISTEN_FDS=2"),
        ("-1", "", "not a count"),
        ("two", "a:b", "not a count"),
    ],
)
def test_listen_fds_inconsistent_environment(monkeypatch, count, names, problem):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", count)
    monkeypatch.setenv("LISTEN_FDNAMES", names)
    with pytest.raises(InvalidArgument, match=problem):
        systemd.listen_fds()
    assert "LISTEN_PID" not in os.environ  # unset even when refusing


def test_listen_fds_names_a_closed_fd(mgr):
    # The manager passes one fd (at 3); the environment claims a second one at 4.
    fd = os.memfd_create("a")
    mgr.put("a", fd)
    os.close(fd)
    code = """
os.environ.update(LISTEN_FDS="2", LISTEN_FDNAMES="a:b")
try:
    systemd.listen_fds()
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    mgr.start(service(code))
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

DOC = {
    "models": {"llama": {"versions": {"v1": {"fds": ["llama@v1.r0"], "size": 123456}}}},
    "aliases": {"prod": "llama@v1"},
}


def test_statefile_round_trip_is_atomic(tmp_path):
    path = tmp_path / "state.json"
    statefile.save(path, {"old": True})
    statefile.save(path, DOC)
    assert statefile.load(path) == DOC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_statefile_every_flipped_byte_is_data_loss(tmp_path):
    path = tmp_path / "state.json"
    statefile.save(path, DOC)
    good = path.read_bytes()
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 1
        path.write_bytes(bad)
        with pytest.raises(DataLoss, match=str(path)):
            statefile.load(path)


def test_statefile_names_each_problem(tmp_path):
    path = tmp_path / "state.json"
    statefile.save(path, DOC)
    good = path.read_text()

    path.write_text(good.replace("123456", "123457"))
    with pytest.raises(ChecksumMismatch, match="is corrupted: the sha256 of its body"):
        statefile.load(path)
    path.write_text(good[: len(good) // 2])
    with pytest.raises(DataLoss, match="is not valid JSON") as e:
        statefile.load(path)
    assert e.value.details["problem"] == "not-json"
    path.write_text(good.replace('"version": 1', '"version": 2'))
    with pytest.raises(DataLoss, match="has format version 2; this daemon reads version 1"):
        statefile.load(path)
    path.write_text('{"models": {}}')
    with pytest.raises(DataLoss, match="is not a hotweights state file"):
        statefile.load(path)
    path.unlink()
    with pytest.raises(DataLoss, match=f"state file {path} is missing"):
        statefile.load(path)


def test_statefile_refuses_what_json_cannot_hold(tmp_path):
    with pytest.raises(InvalidArgument, match="cannot be written as JSON"):
        statefile.save(tmp_path / "s.json", {"fd": object()})
    with pytest.raises(InvalidArgument, match="cannot be written as JSON"):
        statefile.save(tmp_path / "s.json", {"size": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_match_fds_reports_each_disagreement():
    received = {"a": [3], "b": [4, 5], "stray": [6], "empty": []}
    m = statefile.match_fds({"a": 1, "b": 1, "c": 1, "empty": 1}, received)
    assert m.missing == {"c", "empty"} and m.unexpected == {"stray"}
    assert m.miscounted == {"b": (1, 2)} and not m.ok
    assert "'b' came back with 2 fd(s), the state file expects 1" in m.describe()
    missing, unexpected, _ = statefile.match_fds(["a", "b"], received)  # names only: no counts
    assert missing == set() and unexpected == {"stray"}
    assert statefile.match_fds({"a": 1}, {"a": [3]}).ok


def test_restart_with_a_state_file_that_disagrees_with_the_fds(mgr, tmp_path):
    """The daemon's restart path: the store lost one allocation, the state file still lists it."""
    state = tmp_path / "state.json"
    code = """
for name in ("m@1.r0", "m@1.r1"):
    assert systemd.store_fds(name, [os.memfd_create(name)])
statefile.save(sys.argv[1], {"fds": {"m@1.r0": 1, "m@1.r1": 1}})
systemd.ready()
signal.pause()
"""
    mgr.start(service(code) + [str(state)])
    mgr.wait_for("READY", "1")
    mgr.stop(signal.SIGKILL)
    mgr.remove("m@1.r1")
    check = """
doc = statefile.load(sys.argv[1])
try:
    statefile.require_fds(sys.argv[1], doc["fds"], systemd.listen_fds())
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    mgr.restart(service(check) + [str(state)])
    finished(mgr)
    assert (
        f"DataLoss state file {state} disagrees with the fds the service manager passed back: "
        "1 name(s) in the state file got no fd back: 'm@1.r1'"
    ) in mgr.output()


def test_emulator_binds_a_notify_socket_for_a_long_tmp_path(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with ServiceManager(deep, notify_access="all") as m:
        monkeypatch.setenv("NOTIFY_SOCKET", m.notify_socket)
        assert systemd.ready()
        m.wait_for("READY", "1")
        short = os.path.dirname(m.notify_socket)
    assert not os.path.exists(short)
