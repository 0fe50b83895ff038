"""Leases and the one-time tickets that turn a lease into file descriptors."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hotweights.errors import InvalidArgument, PermissionDenied, TicketInvalid, shorten

# A holder names the process for people reading Status and the log; a longer one is a mistake or an attack.
MAX_HOLDER_CHARS = 256
# Leases one process (by the pid it gives at open) holds at once, unless configured otherwise.
MAX_LEASES_PER_PID = 256


def check_holder_label(holder: str) -> str:
    """``holder`` if it is at most MAX_HOLDER_CHARS printable characters, else InvalidArgument."""
    if len(holder) > MAX_HOLDER_CHARS:
        raise InvalidArgument(
            f"lease holder is {len(holder)} characters long; at most {MAX_HOLDER_CHARS} are accepted: "
            f"{shorten(holder, 40)!r}"
        )
    if not holder.isprintable():
        raise InvalidArgument(f"lease holder {holder!r} contains characters that are not printable")
    return holder


@dataclass
class Lease:
    """A lease and its holder: ``pid`` as the holder said at open, ``uid`` as the kernel told at its
    first fd fetch (-1 before). ``key`` goes to the holder alone, on its Lease stream; GetHandles asks
    for it. The id is public (Status shows it); it gives no right to anything."""

    id: str
    ref: str
    name: str
    version: str
    pid: int
    uid: int
    holder: str
    started: float = field(default_factory=time.time)
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    # The last event stamped when the lease resolved its ref: the grant already reflects it and those before.
    seq: int = 0


def new_lease_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Ticket:
    token: str
    lease_id: str
    rank: int
    expires: float
    pid: int = 0  # the lease's holder: only this process may redeem the ticket
    uid: int = -1  # and, once known, only under this uid


def _nspids(pid: int) -> list[str] | None:
    """``pid``'s ids in each pid namespace it is in, outermost first; None when /proc does not say (the
    process is gone, or hidden from this one: the unit's ProtectProc=invisible hides other users')."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[1:]
    except OSError:
        pass
    return None


def same_process(claimed_pid: int, peer_pid: int) -> bool | None:
    """Whether the kernel-reported ``peer_pid`` is the process that said it was ``claimed_pid``: the
    same number, or, for a process in another pid namespace (a container), its pid in its own one.
    None when that cannot be told (/proc hides the peer)."""
    if claimed_pid <= 0 or peer_pid <= 0:
        return False
    if claimed_pid == peer_pid:
        return True
    nspids = _nspids(peer_pid)
    if nspids is None:
        return None
    return len(nspids) > 1 and nspids[-1] == str(claimed_pid)


def check_holder(ticket: Ticket, peer_pid: int, peer_uid: int) -> None:
    """Raises PermissionDenied unless the process (peer_pid, peer_uid) holds the ticket's lease."""
    if ticket.pid <= 0:
        raise PermissionDenied(
            "this lease was opened without its holder's pid: its fds go to no one", lease=ticket.lease_id
        )
    # Where /proc hides the peer, its pid cannot be matched across namespaces; the ticket itself was
    # handed out only to a GetHandles call that showed the lease's key, and the uid is still checked.
    if same_process(ticket.pid, peer_pid) is False or (ticket.uid >= 0 and ticket.uid != peer_uid):
        raise PermissionDenied(
            f"lease {ticket.lease_id[:8]} is held by pid {ticket.pid}: its fds go to that process only "
            f"(this is pid {peer_pid}, uid {peer_uid})",
            lease=ticket.lease_id,
            pid=peer_pid,
            uid=peer_uid,
        )


# Outstanding tickets: in all and per lease. Past either, an old ticket is dropped rather than a new one
# refused: the lease's own oldest, or, in all, the oldest of the process holding the most, so that
# whoever issues tickets fastest loses its own first and never locks the others out.
MAX_TICKETS = 65536
_SPENT = "ticket is unknown, already used or expired: call GetHandles again"
MAX_TICKETS_PER_LEASE = 64


class TicketBook:
    """Short-lived, single-use tickets. Redeeming one consumes it whether or not it is still valid.

    Issue, redeem and the end of a lease cost O(1) each (amortized): one TTL for all means issue order
    is expiry order, so the expired are swept from the front of an ordered dict.
    """

    def __init__(
        self,
        ttl: float = 30.0,
        clock=time.monotonic,
        limit: int = MAX_TICKETS,
        per_lease: int = MAX_TICKETS_PER_LEASE,
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.per_lease = per_lease
        self._clock = clock
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()
        self._by_lease: dict[str, OrderedDict[str, None]] = {}
        self._by_pid: dict[int, OrderedDict[str, None]] = {}
        # pids by how many tickets they hold, and the largest such count: a count moves by one at a
        # time, so finding the process that holds the most costs O(1).
        self._pids_holding: dict[int, set[int]] = {}
        self._most = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, lease_id: str, rank: int, pid: int = 0, uid: int = -1) -> Ticket:
        ticket = Ticket(secrets.token_hex(16), lease_id, rank, self._clock() + self.ttl, pid, uid)
        with self._lock:
            self._sweep(ticket.expires - self.ttl)
            mine = self._by_lease.get(lease_id)
            if mine is not None and len(mine) >= self.per_lease:
                self._remove(next(iter(mine)))
            elif len(self._tickets) >= self.limit:
                greediest = next(iter(self._pids_holding[self._most]))
                self._remove(next(iter(self._by_pid[greediest])))
            self._tickets[ticket.token] = ticket
            self._by_lease.setdefault(lease_id, OrderedDict())[ticket.token] = None
            self._by_pid.setdefault(pid, OrderedDict())[ticket.token] = None
            self._count(pid, +1)
        return ticket

    def held_by(self, pid: int) -> int:
        with self._lock:
            return len(self._by_pid.get(pid, ()))

    def _count(self, pid: int, step: int) -> None:
        n = len(self._by_pid.get(pid, ()))
        before = self._pids_holding.get(n - step)
        if before is not None:
            before.discard(pid)
            if not before:
                del self._pids_holding[n - step]
        if n:
            self._pids_holding.setdefault(n, set()).add(pid)
        if n > self._most:
            self._most = n
        elif self._most not in self._pids_holding:
            self._most = max(0, self._most - 1)

    def redeem(self, token: str, check: Callable[[Ticket], None] = lambda ticket: None) -> Ticket:
        """Consumes the ticket if ``check(ticket)`` passes; what ``check`` raises leaves it unspent, so
        a process that is refused the ticket cannot use it up for its holder either. ``check`` runs
        without the book's lock (it may read /proc); of two redeems of one ticket, only one spends it."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            ticket = self._tickets.get(token)
        if ticket is None or ticket.expires <= now:
            raise TicketInvalid(_SPENT)
        check(ticket)
        with self._lock:
            if self._tickets.get(token) is not ticket:  # spent, dropped or swept while it was checked
                raise TicketInvalid(_SPENT)
            self._remove(token)
        return ticket

    def drop_lease(self, lease_id: str) -> None:
        with self._lock:
            for token in list(self._by_lease.get(lease_id, ())):
                self._remove(token)

    def _remove(self, token: str) -> Ticket | None:
        ticket = self._tickets.pop(token, None)
        if ticket is not None:
            mine = self._by_lease[ticket.lease_id]
            del mine[token]
            if not mine:
                del self._by_lease[ticket.lease_id]
            theirs = self._by_pid[ticket.pid]
            del theirs[token]
            if not theirs:
                del self._by_pid[ticket.pid]
            self._count(ticket.pid, -1)
        return ticket

    def _sweep(self, now: float) -> None:
        while self._tickets:
            first = next(iter(self._tickets.values()))
            if first.expires > now:
                return
            self._remove(first.token)
