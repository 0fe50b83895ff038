"""The registry the model manager's parts share: versions, aliases and leases under one lock, the
decisions' effects run once it is released, and the freeing and retiring of versions.

``ModelManager`` (manager.py) is this plus loading (loading.py) and aliases (aliases.py); each part
reads and changes the same registry under the same lock. See manager.py for what it guarantees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from hotweights.errors import FailedPrecondition, NotFound, Unavailable, shorten
from hotweights.format.checkpoint import HeaderLimits
from hotweights.format.source import DEFAULT_MAX_FILES
from hotweightsd.core.backend import Allocation, MemoryBackend
from hotweightsd.core.events import EventBus, EventKind
from hotweightsd.core.leases import MAX_LEASES_PER_PID, Lease, TicketBook
from hotweightsd.core.registry import ModelVersion, ResidentRank, State, split_ref
from hotweightsd.core.roots import ModelRoots

log = structlog.get_logger("hotweightsd.manager")

# Seconds a retired version restored after a restart waits for the clients that held it to lease it
# again (they retry for 120 s; a restart under the fd store takes seconds).
RELET_GRACE = 30.0
# Aliases named in a NotFound, at most.
_LIST_ALIASES = 10


class DrainSwapFailure(NamedTuple):
    """An alias left naming a version its drain swap freed before the next one failed."""

    old_key: str
    layout: str  # the freed version's engine layout: the swap that mends the alias keeps it
    message: str


class Effects:
    """What a decision taken under the registry lock leaves to do once the lock is released, in order."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._todo: list[Callable[[], Any]] = []

    def free(self, allocations: Iterable[Allocation]) -> None:
        self._todo.extend(a.close for a in allocations)

    def publish(self, kind: EventKind, name: str, **fields: str) -> None:
        # stamped now, under the lock, so that watchers see events in the order of the changes
        self._todo.append(partial(self._bus.deliver, self._bus.stamp(kind, name, **fields)))

    def log(self, level: str, event: str, **kw: Any) -> None:
        self._todo.append(partial(getattr(log, level), event, **kw))

    def run(self) -> None:
        for fn in self._todo:
            try:
                fn()
            except Exception as exc:  # a failed free must not keep the events behind it from going out
                log.error("effect.failed", effect=getattr(fn, "__qualname__", repr(fn)), error=f"{exc}")
        self._todo.clear()


class ManagerState:
    """The registry and its lock; the shared reads and the freeing and retiring every part relies on."""

    if TYPE_CHECKING:  # the parts call one another through the one object they make up together

        def set_alias(self, alias: str, target: str, *, create: bool = False) -> tuple[str, str]: ...

        def is_spare(self, mv: ModelVersion) -> bool: ...

    def __init__(
        self,
        backend: MemoryBackend,
        ticket_ttl: float = 30.0,
        default_verify: str = "fast",
        roots: ModelRoots | None = None,
        max_checkpoint_files: int = DEFAULT_MAX_FILES,
        keep_previous: bool = True,
        keep_previous_seconds: float = 600.0,
        relet_grace: float = RELET_GRACE,
        header_limits: HeaderLimits | None = None,
        max_leases_per_pid: int = MAX_LEASES_PER_PID,
    ) -> None:
        self.backend = backend
        self.max_leases_per_pid = max_leases_per_pid
        self.roots = roots or ModelRoots()
        self.max_checkpoint_files = max_checkpoint_files
        self.keep_previous = keep_previous
        self.keep_previous_seconds = keep_previous_seconds
        self.relet_grace = relet_grace
        self._timers: set[threading.Timer] = set()
        self.header_limits = header_limits or HeaderLimits()
        self.events = EventBus()
        self.tickets = TicketBook(ttl=ticket_ttl)
        self.default_verify = default_verify
        self.started = time.time()
        self._versions: dict[str, ModelVersion] = {}
        self._aliases: dict[str, str] = {}  # alias -> "name@version"
        self._leases: dict[str, Lease] = {}
        self._leases_of: dict[int, int] = {}  # pid as given at open -> leases it holds
        # lease id -> the version object it was granted: a later version loaded under the same key
        # (after a forced unload) is other memory, and never the lease's
        self._lease_target: dict[str, ModelVersion] = {}
        # alias -> why it names nothing: its drain swap freed the old version and the new one failed
        self._swap_failed: dict[str, DrainSwapFailure] = {}
        self._lock = threading.RLock()
        self._admit_lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._local = threading.local()

    @contextmanager
    def _txn(self) -> Iterator[Effects]:
        """Holds the registry lock for a decision; runs the effects it queued once the lock is released.

        Nested in another on the same thread, it shares the outer one's effects (run at its end).
        """
        outer: Effects | None = getattr(self._local, "effects", None)
        if outer is not None:
            with self._lock:
                yield outer
            return
        fx = Effects(self.events)
        try:
            with self._lock:
                self._local.effects = fx
                try:
                    yield fx
                finally:
                    self._local.effects = None
        finally:
            fx.run()

    def versions(self) -> list[ModelVersion]:
        with self._lock:
            return sorted(self._versions.values(), key=lambda v: (v.name, v.created))

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._aliases)

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def require_alias(self, alias: str, *, creatable: bool = True) -> str:
        """The key ``alias`` points at; NotFound naming the known aliases when there is no such alias
        (with the hint to create it where the caller can: a swap or an alias move, not a rollback)."""
        with self._lock:
            key = self._aliases.get(alias)
            if key is not None:
                return key
            known = sorted(self._aliases)
        listed = ", ".join(shorten(a) for a in known[:_LIST_ALIASES])
        if len(known) > _LIST_ALIASES:
            listed += f" and {len(known) - _LIST_ALIASES} more"
        # Worded for the CLI, where most typos are made; the API's create argument is its counterpart.
        hint = "; pass --create to make a new one" if creatable else ""
        raise NotFound(
            f"no alias named {shorten(alias)!r} (known aliases: {listed or 'none'}){hint}",
            alias=alias,
            aliases=known[:_LIST_ALIASES],
        )

    def alias_target(self, alias: str) -> tuple[str, int]:
        """(the key ``alias`` names, "" when there is no such alias; the last event stamped), read together."""
        with self._lock:
            return self._aliases.get(alias, ""), self.events.stamped

    def aliases_of(self, key: str) -> list[str]:
        with self._lock:
            return sorted(a for a, k in self._aliases.items() if k == key)

    def get(self, name: str, version: str) -> ModelVersion:
        with self._lock:
            mv = self._versions.get(f"{name}@{version}")
        if mv is None:
            raise NotFound(f"model {shorten(name)}@{shorten(version)} is not loaded", ref=f"{name}@{version}")
        return mv

    def find(self, key: str) -> ModelVersion | None:
        """The version registered under ``NAME@VERSION``, or None."""
        with self._lock:
            return self._versions.get(key)

    def resolve(self, ref: str, *, ready: bool = True) -> ModelVersion:
        """An alias, ``NAME@VERSION``, or ``NAME`` (its newest READY version)."""
        with self._lock:
            if ref in self._aliases:
                mv = self._versions.get(self._aliases[ref])
                failed = self.drain_swap_failure(ref) if mv is None else None
                if failed is not None:
                    raise FailedPrecondition(failed.message, ref=ref)
                if mv is None:
                    raise Unavailable(
                        f"alias {shorten(ref)!r} is between versions (a drain swap is loading its next version);"
                        " retry shortly",
                        ref=ref,
                    )
            else:
                name, version = split_ref(ref)
                if version is not None:
                    mv = self.get(name, version)
                else:
                    candidates = [v for v in self._versions.values() if v.name == name]
                    if not candidates:
                        raise NotFound(f"no model, version or alias named {shorten(ref)!r} is loaded", ref=ref)
                    live = [v for v in candidates if v.state is State.READY and not v.retire]
                    mv = max(live or candidates, key=lambda v: v.created)
            if ready and mv.state is not State.READY:
                hint = f": {mv.error}" if mv.error else ""
                raise FailedPrecondition(
                    f"{mv.key} is {mv.state.value}, not READY{hint}", ref=ref, state=mv.state.value
                )
            return mv

    def unique_allocations(self) -> list[tuple[ModelVersion, ResidentRank, Allocation]]:
        """Every allocation the registry holds, once, with the oldest version and its rank holding it.

        Versions loaded from the same files share their allocations: counting per version would count
        the same memory twice.
        """
        with self._lock:
            versions = sorted(self._versions.values(), key=lambda v: (v.created, v.name, v.version))
            seen: set[int] = set()
            out = []
            for v in versions:
                for r in list(v.ranks):
                    for a in r.allocations:
                        if id(a) not in seen:
                            seen.add(id(a))
                            out.append((v, r, a))
            return out

    def shares_with(self, mv: ModelVersion) -> str:
        """The key of the version whose memory ``mv`` was given at its load while it still holds some
        of it; "" when ``mv`` read its own, or that version has gone (``mv`` holds the memory alone)."""
        with self._lock:
            source = self._versions.get(mv.shares) if mv.shares else None
            if source is None or source is mv:
                return ""
            mine = {id(a) for r in mv.ranks for a in r.allocations}
            return source.key if any(id(a) in mine for r in source.ranks for a in r.allocations) else ""

    def resident_by_device(self) -> dict[int, int]:
        """Bytes held per device, each shared allocation counted once."""
        return bytes_by_device(self.unique_allocations())

    def resident_bytes(self) -> int:
        """Bytes held, each shared allocation counted once (a version's own ``resident_bytes`` is its full size)."""
        return sum(a.size for _, _, a in self.unique_allocations())

    def drain_swap_failure(self, alias: str) -> DrainSwapFailure | None:
        """Why ``alias`` names nothing, if a failed drain swap left it so and nothing has moved it since."""
        with self._lock:
            failed = self._swap_failed.get(alias)
            if failed is None or self._aliases.get(alias) != failed.old_key or failed.old_key in self._versions:
                return None
            return failed

    def _settle(self, mv: ModelVersion) -> None:
        """Marks ``mv``'s load as over, its effects carried out, and wakes the loads waiting on it."""
        mv.settled.set()
        with self._lock:
            self._changed.notify_all()

    def _drop(self, mv: ModelVersion, fx: Effects) -> None:
        """Removes a version from the registry and queues its memory to be freed (lock held)."""
        self._stop_or_free(mv, fx)
        mv.state = State.UNLOADING
        self._versions.pop(mv.key, None)
        self._changed.notify_all()
        fx.log("info", "version.freed", model=mv.key)
        fx.publish(EventKind.VERSION_FREED, mv.name, version=mv.version)

    def _stop_or_free(self, mv: ModelVersion, fx: Effects) -> None:
        """A loading version is cancelled and its loader frees the memory once its readers have
        stopped (freeing under in-flight copies would let them write into released memory);
        any other version's memory is queued to be freed."""
        if mv.state is State.LOADING:
            mv.cancel.set()
        else:
            self._free_memory(mv, fx)

    def _shared_elsewhere(self, mv: ModelVersion) -> set[int]:
        """The ids of ``mv``'s allocations that another registered version holds too (lock held)."""
        mine = {id(a) for r in mv.ranks for a in r.allocations}
        return {id(a) for v in self._versions.values() if v is not mv for r in v.ranks for a in r.allocations} & mine

    def _own(self, mv: ModelVersion) -> list[tuple[int, Allocation]]:
        """(device, allocation) of what ``mv`` holds that no other registered version shares: what
        freeing it now would give back (lock held)."""
        held = self._shared_elsewhere(mv)
        return [(r.device, a) for r in mv.ranks for a in r.allocations if id(a) not in held]

    def _own_bytes(self, mv: ModelVersion) -> int:
        return sum(a.size for _, a in self._own(mv))

    def _free_memory(self, mv: ModelVersion, fx: Effects) -> None:
        """Takes ``mv``'s memory out of the registry at once (nothing serves it any more) and queues
        to free what no other registered version shares (lock held); the last holder frees it."""
        if mv.ranks:
            fx.free([a for _, a in self._own(mv)])
        mv.ranks = []

    def _maybe_retire(self, mv: ModelVersion, fx: Effects) -> None:
        if (
            mv.retire
            and not mv.leases
            and not mv.held(time.monotonic())
            and not self.aliases_of(mv.key)
            and self._versions.get(mv.key) is mv  # not a later version loaded under the same key
        ):
            self._drop(mv, fx)

    def _recheck_later(self, mv: ModelVersion, delay: float) -> None:
        """Looks at ``mv`` again once a hold may have ended (lock held)."""
        if self._closed:
            return
        timer = threading.Timer(max(delay, 0.0) + 0.01, self._recheck, (mv,))
        timer.daemon = True
        timer.name = "hw-hold"
        self._timers.add(timer)
        timer.start()

    def _recheck(self, mv: ModelVersion) -> None:
        with self._txn() as fx:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
            now = time.monotonic()
            if mv.hold_until and mv.hold_until <= now:
                fx.log("info", "previous.expired", model=mv.key, alias=mv.previous_of, leases=len(mv.leases))
                self._unhold(mv)
            if mv.relet_until and mv.relet_until <= now:
                mv.relet_until = 0.0
            self._maybe_retire(mv, fx)

    @staticmethod
    def _unhold(mv: ModelVersion) -> None:
        mv.hold_until = mv.held_until_unix = 0.0
        mv.previous_of = ""

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the daemon is shutting down")


def bytes_by_device(held: Iterable[tuple[ModelVersion, ResidentRank, Allocation]]) -> dict[int, int]:
    """The sizes of ``held`` (``unique_allocations()``) summed per device."""
    out: dict[int, int] = {}
    for _, r, a in held:
        out[r.device] = out.get(r.device, 0) + a.size
    return out


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
