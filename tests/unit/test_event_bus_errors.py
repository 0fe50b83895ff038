"""A subscriber that raises must not stop the bus: the others get every event, in order."""

from __future__ import annotations

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
