"""Each rank's encoded GetHandles answer, built once and reused by every attach of that rank.

Encoding thousands of entries on each attach would cost more than the rest of the attach. The first
attaches of one rank (replicas starting together) wait for one encoder; a big table of one model
delays no other model's or rank's. An entry goes when its version is freed or fails, and an entry
built for another version object under the same key (reloaded after a forced unload) is never served.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hotweights.wire.pb import pb
from hotweightsd.core.events import Event, EventKind
from hotweightsd.core.registry import ResidentRank

Key = tuple[str, int, bool]  # (version key, rank, compact)


class _Encoder:
    """The lock of one table being encoded, and how many callers hold or wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class TableCache:
    def __init__(self) -> None:
        # key -> (the rank encoded, its answer): the rank object tells a reloaded version of the same key
        self._tables: dict[Key, tuple[ResidentRank, pb.GetHandlesResponse]] = {}
        self._lock = threading.Lock()
        # One lock per table being encoded (under _lock, gone once no caller needs it).
        self._encoders: dict[Key, _Encoder] = {}

    def get(self, key: Key, rank: ResidentRank, build: Callable[[], pb.GetHandlesResponse]) -> pb.GetHandlesResponse:
        """The answer for ``rank`` under ``key``, built by ``build`` by one caller when there is none."""
        with self._lock:
            cached = self._tables.get(key)
            if cached is not None and cached[0] is rank:
                return cached[1]
            encoder = self._encoders.setdefault(key, _Encoder())
            encoder.users += 1
        try:
            with encoder.lock:
                with self._lock:
                    cached = self._tables.get(key)
                if cached is None or cached[0] is not rank:
                    cached = (rank, build())
                    with self._lock:
                        self._tables[key] = cached
        finally:
            with self._lock:
                encoder.users -= 1
                if not encoder.users:
                    del self._encoders[key]
        return cached[1]

    def encoding(self) -> int:
        """Tables being encoded or waited for now."""
        with self._lock:
            return len(self._encoders)

    def forget(self, ev: Event) -> None:
        """An event subscriber: runs on the publishing thread, so it only drops dict entries."""
        if ev.kind in (EventKind.VERSION_FREED, EventKind.VERSION_FAILED):
            key = f"{ev.name}@{ev.version}"
            with self._lock:
                for k in [k for k in self._tables if k[0] == key]:
                    del self._tables[k]
