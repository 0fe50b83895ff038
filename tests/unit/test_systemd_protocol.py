"""hotweightsd.persist.systemd and .statefile on their own: the environment they read, the fields
and names they refuse, the state file's round trip and checks. No service manager runs here
(tests/integration/test_systemd.py has the emulated one)."""

from __future__ import annotations

import asyncio
import os

import pytest

from hotweights.errors import ChecksumMismatch, DataLoss, InvalidArgument, Unavailable
from hotweightsd.persist import statefile, systemd
from support.sdenv import no_service_manager  # noqa: F401 (autouse fixture)

# -- notify and the environment ----------------------------------------------------------------


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
