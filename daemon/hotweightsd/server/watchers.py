"""Fan-out of the core's events to the servicer's streams (Watch, Lease), off the publishing thread.

The hub is the event bus's one subscriber for every stream. On the publishing thread it takes a
snapshot of the aliases (only while an alias watcher needs one) and hands the event to the event
loop in a single call. On the loop, each subscriber's filter runs and its bounded queue gets the
event with ``put_nowait``, a chunk of subscribers per turn of the loop, so that with ten thousand
watchers a health check waits for one chunk's streams, not for all of them. A subscriber whose
queue is full is dropped (a Watch stream ends with RESOURCE_EXHAUSTED) or loses its oldest event
(a Lease stream: only the newest alias move matters). A slow subscriber never slows the publisher
or the others.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from enum import Enum

import structlog

from hotweights import errors
from hotweightsd.core.events import Event, EventBus

log = structlog.get_logger("hotweightsd.watchers")

QUEUE_DEPTH = 1024  # events a subscriber may have unread; docs/limits.md
# Seconds between chunks of a fan-out (docs/limits.md).
CHUNK_PAUSE_SECONDS = 0.01
CHUNK = 128  # subscribers given an event at a time, CHUNK_PAUSE_SECONDS apart
Filter = Callable[[Event, Mapping[str, str]], bool]


class Overflow(str, Enum):
    DROP = "drop"  # the subscriber is dropped: its next get raises ResourceExhausted
    DROP_OLDEST = "drop_oldest"  # the oldest unread event makes room


class _Dropped:
    pass


_DROPPED = _Dropped()


class Subscription:
    __slots__ = ("id", "keep", "queue", "overflow", "needs_aliases", "dropped")

    def __init__(self, sid: int, keep: Filter, depth: int, overflow: Overflow, needs_aliases: bool) -> None:
        self.id = sid
        self.keep = keep
        self.queue: asyncio.Queue[Event | _Dropped] = asyncio.Queue(depth)
        self.overflow = overflow
        self.needs_aliases = needs_aliases
        self.dropped = False

    async def get(self) -> Event:
        item = await self.queue.get()
        if isinstance(item, _Dropped):
            depth = self.queue.maxsize
            raise errors.ResourceExhausted(
                f"this stream fell {depth} events behind and was dropped; watch again and re-read the state "
                f"(hotweights list) to catch up",
                queue_depth=depth,
            )
        return item


class EventHub:
    """One bus subscription shared by every stream; subscribe and unsubscribe on the event loop only."""

    def __init__(
        self, bus: EventBus, aliases: Callable[[], dict[str, str]], depth: int = QUEUE_DEPTH, chunk: int = CHUNK
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._aliases = aliases
        self._depth = depth
        self._chunk = chunk
        # events handed over and not yet given to every subscriber: [event, aliases, subscribers, next index]
        self._pending: deque[list] = deque()
        self._draining = False
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._alias_subs = 0  # read by the publishing thread: a snapshot is taken only while this is > 0
        self.dropped = 0
        self._unsubscribe = bus.subscribe(self._push)

    def __len__(self) -> int:
        return len(self._subs)

    def close(self) -> None:
        self._unsubscribe()

    def subscribe(self, keep: Filter, overflow: Overflow = Overflow.DROP, needs_aliases: bool = False) -> Subscription:
        sub = Subscription(next(self._ids), keep, self._depth, overflow, needs_aliases)
        self._subs[sub.id] = sub
        self._alias_subs += needs_aliases
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None:
            self._alias_subs -= sub.needs_aliases

    def _push(self, ev: Event) -> None:
        # the publishing thread: one snapshot and one hand-over, whatever the number of subscribers
        aliases = self._aliases() if self._alias_subs else {}
        try:
            self._loop.call_soon_threadsafe(self._enqueue, ev, aliases)
        except RuntimeError:
            pass  # the loop closed (shutdown): nobody is listening any more

    def _enqueue(self, ev: Event, aliases: Mapping[str, str]) -> None:
        # the subscribers as they are now: one that subscribes later does not get this event
        self._pending.append([ev, aliases, list(self._subs.values()), 0])
        if not self._draining:
            self._draining = True
            self._drain()

    def _drain(self) -> None:
        """Gives events to at most ``chunk`` subscribers, in event order, then yields the loop."""
        budget = self._chunk
        while self._pending and budget > 0:
            item = self._pending[0]
            ev, aliases, subs, start = item
            end = min(len(subs), start + budget)
            self._dispatch(ev, aliases, subs[start:end])
            budget -= end - start
            if end == len(subs):
                self._pending.popleft()
            else:
                item[3] = end
        if self._pending:
            # A pause between chunks, not just a turn of the loop: each event given wakes a stream that
            # writes, and gRPC hands its completions back in order, so a health check that arrives behind
            # ten thousand writes waits for all of them; paced, it waits for one chunk's.
            self._loop.call_later(CHUNK_PAUSE_SECONDS, self._drain)
        else:
            self._draining = False

    def _dispatch(self, ev: Event, aliases: Mapping[str, str], subs: list[Subscription]) -> None:
        for sub in subs:
            if sub.id not in self._subs:
                continue  # gone (or dropped) since the event was handed over
            try:
                if not sub.keep(ev, aliases):
                    continue
            except Exception as exc:  # one broken filter must not stop the others
                log.error("watch.filter_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            try:
                sub.queue.put_nowait(ev)
            except asyncio.QueueFull:
                self._overflowed(sub, ev)

    def _overflowed(self, sub: Subscription, ev: Event) -> None:
        if sub.overflow is Overflow.DROP_OLDEST:
            sub.queue.get_nowait()
            sub.queue.put_nowait(ev)
            return
        self.unsubscribe(sub)
        sub.dropped = True
        self.dropped += 1
        while not sub.queue.empty():  # its unread events are freed now, not when its stream ends
            sub.queue.get_nowait()
        sub.queue.put_nowait(_DROPPED)
        log.warning("watch.dropped", subscriber=sub.id, queue_depth=self._depth, event_seq=ev.seq)
