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
    time: float = field(default_factory=time.time)
    seq: int = 0


Subscriber = Callable[[Event], None]


class EventBus:
    """Delivers each event to every subscriber, in order, on the publishing thread.

    Subscribers must not block: the servicer's hand the event to an asyncio loop and return.
    """

    def __init__(self) -> None:
        self._subs: dict[int, Subscriber] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            sid = next(self._ids)
            self._subs[sid] = fn

        def unsubscribe() -> None:
            with self._lock:
                self._subs.pop(sid, None)

        return unsubscribe

    def publish(self, kind: EventKind, name: str, **fields: str) -> Event:
        with self._lock:
            event = Event(kind, name, seq=next(self._seq), **fields)  # type: ignore[arg-type]
            subs = list(self._subs.values())
        for fn in subs:
            try:
                fn(event)
            except Exception as exc:  # one broken subscriber must not stop the others or the publisher
                log.error("event.subscriber_failed", event=kind.value, error=f"{type(exc).__name__}: {exc}")
        return event
