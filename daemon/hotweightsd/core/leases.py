"""Leases and the one-time tickets that turn a lease into file descriptors."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

from hotweights.errors import TicketInvalid


@dataclass
class Lease:
    id: str
    ref: str
    name: str
    version: str
    pid: int
    uid: int
    holder: str
    started: float = field(default_factory=time.time)


def new_lease_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Ticket:
    token: str
    lease_id: str
    rank: int
    expires: float


class TicketBook:
    """Short-lived, single-use tickets. Redeeming one consumes it whether or not it is still valid."""

    def __init__(self, ttl: float = 30.0, clock=time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}
        self._lock = threading.Lock()

    def issue(self, lease_id: str, rank: int) -> Ticket:
        ticket = Ticket(secrets.token_hex(16), lease_id, rank, self._clock() + self.ttl)
        with self._lock:
            self._expire()
            self._tickets[ticket.token] = ticket
        return ticket

    def redeem(self, token: str) -> Ticket:
        with self._lock:
            self._expire()
            ticket = self._tickets.pop(token, None)
        if ticket is None:
            raise TicketInvalid("ticket is unknown, already used or expired: call GetHandles again")
        return ticket

    def drop_lease(self, lease_id: str) -> None:
        with self._lock:
            for token in [t for t, v in self._tickets.items() if v.lease_id == lease_id]:
                del self._tickets[token]

    def _expire(self) -> None:
        now = self._clock()
        for token in [t for t, v in self._tickets.items() if v.expires <= now]:
            del self._tickets[token]
