"""The persister's thread outlives any one failed item, stores a version's fds all or nothing, and
reports its own death instead of leaving the daemon serving with nothing persisted."""

from __future__ import annotations

import os
import threading

import pytest

from hotweights.errors import Unavailable
from hotweightsd.core.events import EventBus, EventKind
from hotweightsd.persist import statefile, systemd
from hotweightsd.persist.fdstore import Persister, fd_name


class _Manager:
    """What the persister reads of the manager: events, each version's fds, the registry."""

    def __init__(self, allocations: int) -> None:
        self.events = EventBus()
        self.allocations = allocations

    def export_fds(self, key: str) -> list[tuple[int, int, int]]:
        return [(0, i, os.memfd_create("persist-test")) for i in range(self.allocations)]

    def versions(self) -> list:
        return []

    def aliases(self) -> dict:
        return {}


@pytest.fixture
def store(monkeypatch):
    """The fd store's messages, recorded; a name in ``refuse`` makes its FDSTORE fail like a dead socket."""
    stored: list[str] = []
    removed: list[str] = []
    refuse: set[str] = set()

    def store_fds(name, fds, *, poll=False):
        systemd.check_fdname(name)
        if name in refuse or name.split("/")[1] in refuse:
            raise Unavailable("the notify socket refused the message")
        stored.append(name)
        return True

    def remove_fds(name):
        removed.append(systemd.check_fdname(name))
        return True

    monkeypatch.setattr(systemd, "store_fds", store_fds)
    monkeypatch.setattr(systemd, "remove_fds", remove_fds)
    return stored, removed, refuse


def _persister(tmp_path, manager, **kw) -> Persister:
    p = Persister(manager, tmp_path / "hw.sock.state.json", str(tmp_path / "hw.sock"), fdstore=True, **kw)
    p.start()
    return p


def test_a_failed_store_is_logged_and_the_next_version_is_still_stored(tmp_path, store):
    stored, removed, refuse = store
    m = _Manager(allocations=3)
    p = _persister(tmp_path, m)
    refuse.add(fd_name("bad@v1", 0, 2))  # the last of its three fds
    m.events.publish(EventKind.VERSION_READY, "bad", version="v1")
    m.events.publish(EventKind.VERSION_READY, "good", version="v1")
    assert p.flush()
    assert p._thread.is_alive() and p.failure is None
    # the two fds of bad@v1 that went in came out again: the store holds it whole or not at all
    assert removed == [fd_name("bad@v1", 0, 0), fd_name("bad@v1", 0, 1)]
    assert "bad@v1" not in p._stored
    assert p._stored["good@v1"] == [fd_name("good@v1", 0, i) for i in range(3)]
    p.close()


def test_an_unexpected_error_in_one_item_does_not_end_the_thread(tmp_path, store, monkeypatch):
    m = _Manager(allocations=1)
    p = _persister(tmp_path, m)
    calls = []

    def export_fds(key):
        calls.append(key)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return _Manager.export_fds(m, key)

    monkeypatch.setattr(m, "export_fds", export_fds)
    m.events.publish(EventKind.VERSION_READY, "a", version="v1")
    m.events.publish(EventKind.VERSION_READY, "b", version="v1")
    assert p.flush()
    assert list(p._stored) == ["b@v1"] and p.failure is None
    p.close()


def test_a_name_systemd_would_refuse_is_stored_under_a_bounded_name(tmp_path, store):
    stored, _, _ = store
    m = _Manager(allocations=1)
    p = _persister(tmp_path, m)
    m.events.publish(EventKind.VERSION_READY, "n" * 128, version="v" * 128)
    assert p.flush()
    (name,) = stored
    assert systemd.check_fdname(name) == name and len(name) <= 255
    assert name == fd_name("n" * 128 + "@" + "v" * 128, 0, 0) != fd_name("n" * 128 + "@" + "v" * 127, 0, 0)
    assert fd_name("m@v1", 2, 3) == "hw/m@v1/2/3"  # a name that fits stays readable
    p.close()


def test_a_dead_thread_is_reported_and_flush_says_so(tmp_path, store, monkeypatch):
    died = threading.Event()
    seen: list[BaseException] = []

    def save(path, doc):
        raise SystemExit("not an Exception: nothing inside the loop catches it")

    monkeypatch.setattr(statefile, "save", save)
    m = _Manager(allocations=1)
    p = _persister(tmp_path, m, on_failure=lambda exc: (seen.append(exc), died.set()))
    assert died.wait(30)
    assert isinstance(p.failure, SystemExit) and seen == [p.failure]
    assert p.flush(timeout=30) is False
    p.close()
