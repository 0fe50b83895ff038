"""The bus delivers every event, in order: a subscriber that raises does not stop the others, and an
event published while another thread gives up delivering is not left parked."""

from __future__ import annotations

import threading

import pytest

from hotweightsd.core.events import EventBus, EventKind


def test_a_raising_subscriber_is_logged_and_the_others_keep_getting_events():
    bus = EventBus()
    got: list[int] = []

    def broken(ev):
        if ev.seq == 2:
            raise ValueError("broken subscriber")

    bus.subscribe(lambda ev: None)
    bus.subscribe(broken)
    bus.subscribe(lambda ev: got.append(ev.seq))
    for kind in (EventKind.VERSION_ADDED, EventKind.VERSION_READY, EventKind.ALIAS_MOVED, EventKind.VERSION_FREED):
        bus.publish(kind, "m", version="v1")
    assert got == [1, 2, 3, 4]


def test_delivery_resumes_after_a_subscriber_raises_past_the_guard():
    """A BaseException is not the subscriber's to swallow; it reaches the publisher, and the next
    publisher still delivers (its own event and any left waiting)."""
    bus = EventBus()
    got: list[int] = []

    def interrupt(ev):
        if ev.seq == 1:
            raise KeyboardInterrupt

    bus.subscribe(interrupt)
    bus.subscribe(lambda ev: got.append(ev.seq))
    with pytest.raises(KeyboardInterrupt):
        bus.publish(EventKind.VERSION_ADDED, "m", version="v1")
    bus.publish(EventKind.VERSION_READY, "m", version="v1")
    assert got == [2]


class _PausingLock:
    """The bus lock, made to stop its holder right after one release (armed by that thread) until told to
    go on: the gap between the delivering thread finding nothing left and its return is held open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed_for: threading.Thread | None = None
        self.released = threading.Event()
        self.go = threading.Event()

    def __enter__(self) -> _PausingLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if threading.current_thread() is self.armed_for:
            self.armed_for = None
            self.released.set()
            assert self.go.wait(timeout=30)


def test_an_event_published_while_the_deliverer_finishes_is_delivered():
    """A thread that delivers while another is giving up delivery (it found nothing left) must not
    leave its event parked for the next, unrelated, event."""
    bus = EventBus()
    lock = _PausingLock()
    bus._lock = lock  # type: ignore[assignment]
    got: list[int] = []

    def record(ev):
        got.append(ev.seq)
        if ev.seq == 1:  # the deliverer's next release is the one that finds nothing left
            lock.armed_for = threading.current_thread()

    bus.subscribe(record)
    first = bus.stamp(EventKind.VERSION_READY, "m", version="v1")
    second = bus.stamp(EventKind.ALIAS_MOVED, "m", version="v1", alias="prod")
    errors: list[BaseException] = []

    def deliver_first() -> None:
        try:
            bus.deliver(first)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=deliver_first)
    t.start()
    try:
        assert lock.released.wait(timeout=30)
        bus.deliver(second)  # while the first deliverer is stopped in the gap
    finally:
        lock.go.set()
        t.join(timeout=30)
    assert not t.is_alive() and not errors
    assert got == [1, 2]
    assert bus._waiting == {}
