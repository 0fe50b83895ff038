"""Watch events and the bus that fans them out to subscribers (Watch streams, lease streams)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import structlog

log = structlog.get_logger("hotweightsd.events")


class EventKind(str, Enum):
    VERSION_ADDED = "VERSION_ADDED"
    VERSION_READY = "VERSION_READY"
    VERSION_FAILED = "VERSION_FAILED"
    ALIAS_MOVED = "ALIAS_MOVED"
    VERSION_DRAINING = "VERSION_DRAINING"
    VERSION_FREED = "VERSION_FREED"
    ALIAS_REMOVED = "ALIAS_REMOVED"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    name: str
    version: str = ""
    alias: str = ""
    old_version: str = ""
    message: str = ""
    # VERSION_FAILED: the error's class (InsufficientMemory, BackendError, ...), for counting failures.
    reason: str = ""
    time: float = field(default_factory=time.time)
    seq: int = 0


Subscriber = Callable[[Event], None]


class EventBus:
    """Fans events out to subscribers in the order the registry decided them.

    The registry stamps an event (gives it its sequence number) while it holds its lock, so the
    numbers follow the order of the state changes; it delivers the event after releasing the lock.
    Delivery is in sequence order: an event stamped later waits until every earlier one has been
    delivered, whichever thread delivers it. Subscribers run on the delivering thread and must not
    block: the servicer's bridges hand the event to an asyncio loop, the persister puts it on its
    own queue, and both return at once. An event that is stamped must be delivered.
    """

    def __init__(self) -> None:
        self._subs: dict[int, Subscriber] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stamped = 0
        self._next = 1  # the sequence number delivered next
        self._waiting: dict[int, Event] = {}
        self._delivering: object | None = None  # the claim of the call delivering now

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            sid = next(self._ids)
            self._subs[sid] = fn

        def unsubscribe() -> None:
            with self._lock:
                self._subs.pop(sid, None)

        return unsubscribe

    @property
    def stamped(self) -> int:
        """The sequence number of the last event stamped (0: none yet)."""
        with self._lock:
            return self._stamped

    def stamp(self, kind: EventKind, name: str, **fields: str) -> Event:
        """The event with its sequence number; the caller must ``deliver`` it."""
        with self._lock:
            self._stamped += 1
            return Event(kind, name, seq=self._stamped, **fields)  # type: ignore[arg-type]

    def deliver(self, event: Event) -> None:
        mine = object()  # this call's claim on delivery, told apart from a later caller's
        with self._lock:
            self._waiting[event.seq] = event
            if self._delivering is not None:
                return  # the thread delivering now takes this one too, in its turn
            self._delivering = mine
        try:
            while True:
                with self._lock:
                    ev = self._waiting.pop(self._next, None)
                    if ev is None:
                        # Given up in the same critical section that found nothing left: an event parked
                        # after the lock is released finds no deliverer and delivers itself.
                        self._delivering = None
                        return
                    self._next += 1
                    subs = list(self._subs.values())
                for fn in subs:
                    try:
                        fn(ev)
                    except Exception as exc:  # one broken subscriber must not stop the others or the publisher
                        log.error("event.subscriber_failed", kind=ev.kind.value, error=f"{type(exc).__name__}: {exc}")
        finally:
            # Whatever escapes (a BaseException from a subscriber), the next publisher must deliver again.
            # Only this call sets or clears its own claim, so reading it unlocked is safe; once given up
            # above, the claim may already be another caller's, which must not be cleared.
            if self._delivering is mine:
                with self._lock:
                    self._delivering = None

    def publish(self, kind: EventKind, name: str, **fields: str) -> Event:
        """Stamps and delivers at once: for events no lock orders."""
        event = self.stamp(kind, name, **fields)
        self.deliver(event)
        return event
