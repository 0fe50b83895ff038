"""The model manager: loads, leases, handles, aliases, swaps and frees, over one MemoryBackend.

Every public method is synchronous and thread-safe; the servicer runs them in worker threads,
never on its event loop. State changes under one registry lock, effects after it: a method decides
under the lock which allocations to free and which events to publish (an ``Effects`` list), and
carries them out once the lock is released, so a slow GPU free or a subscriber never stalls
another caller. Guarantees:
- memory a live lease points at is never freed by the daemon (``force`` only drops the daemon's
  reference; a client's mapping keeps its pages alive);
- a load that would not fit is refused before any file is read;
- a load of the very files a READY version was read from (same inodes, sizes, mtimes and headers,
  whatever the path) shares that version's allocations and reads no tensor data; one of files another
  version is still reading waits for that read and shares its result (and reads them itself if that
  read fails or goes away); an allocation is freed when the last registered version holding it goes,
  and counted once in what is resident;
- a version retired by a swap or a deferred unload is freed when its last lease ends, and no
  sooner than its hold: the previous version a swap keeps for a rollback stays ``keep_previous_seconds``,
  and one restored after a restart waits ``relet_grace`` seconds for its holders to lease it again;
- an alias is only created where the caller says so (``create``): a typo is NotFound, never a new alias.

It is made of parts over one registry: ``state.py`` (the registry, its lock, the freeing and
retiring of versions), ``loading.py`` (loads and what they share), ``aliases.py`` (aliases,
rollbacks, drains); this module adds unloads, leases and handles, and the daemon's lifetime.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from hotweights.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LeaseHeld,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    shorten,
)
from hotweightsd.core.aliases import AliasesMixin
from hotweightsd.core.backend import Allocation, AllocationMode
from hotweightsd.core.events import EventKind
from hotweightsd.core.leases import Lease, check_holder, check_holder_label, new_lease_id
from hotweightsd.core.loading import VERIFY_LEVELS, LoadingMixin, LoadStart
from hotweightsd.core.registry import ModelVersion, ResidentRank, State, split_ref
from hotweightsd.core.state import RELET_GRACE, DrainSwapFailure, bytes_by_device

log = structlog.get_logger("hotweightsd.manager")

__all__ = [
    "RELET_GRACE",
    "VERIFY_LEVELS",
    "DrainSwapFailure",
    "Handles",
    "LoadStart",
    "ModelManager",
    "bytes_by_device",
]


@dataclass(frozen=True)
class Handles:
    version: ModelVersion
    rank: ResidentRank
    ticket: str
    ttl: float


class ModelManager(LoadingMixin, AliasesMixin):
    """Loads, leases, handles, aliases, swaps and frees over one MemoryBackend (module docstring)."""

    def unload(self, ref: str, force: bool = False) -> tuple[list[str], int]:
        """Frees NAME (every version) or NAME@VERSION; returns (the keys, the bytes given back now).

        Forced, the version's aliases go with it, and so do the versions kept for their rollback:
        with the alias gone nothing can roll back to them. Memory a live lease still maps is not
        counted: it comes back when the lease ends."""
        with self._txn() as fx:
            targets = self._unload_targets(ref)
            for mv in targets:
                aliases = self.aliases_of(mv.key)
                if aliases and not force:
                    raise FailedPrecondition(
                        f"{mv.key} is the target of alias(es) {', '.join(aliases)}: move or remove them first, "
                        f"or pass --force",
                        ref=mv.key,
                        aliases=aliases,
                    )
                if mv.leases and not force:
                    raise LeaseHeld(
                        f"{mv.key} has {len(mv.leases)} live lease(s); release them or pass --force "
                        f"(forced: clients keep their mapped copy)",
                        ref=mv.key,
                        leases=len(mv.leases),
                    )
            freed, total, removed = [], 0, []
            for mv in targets:
                for a in self.aliases_of(mv.key):
                    del self._aliases[a]
                    self._swap_failed.pop(a, None)
                    fx.publish(EventKind.ALIAS_REMOVED, mv.name, version=mv.version, alias=a)
                    removed.append(a)
                if not mv.leases:
                    total += self._own_bytes(mv)
                self._drop(mv, fx)
                freed.append(mv.key)
            for a in removed:  # after the targets: a kept version that is one of them was counted above
                self.release_kept(a)
        return freed, total

    def _unload_targets(self, ref: str) -> list[ModelVersion]:
        if ref in self._aliases:
            raise InvalidArgument(
                f"{ref!r} is an alias; unload NAME or NAME@VERSION (the alias names {self._aliases[ref]})"
            )
        name, version = split_ref(ref)
        if version is not None:
            return [self.get(name, version)]
        targets = [v for v in self._versions.values() if v.name == name]
        if not targets:
            raise NotFound(f"no model named {shorten(name)!r} is loaded", ref=ref)
        return targets

    def open_lease(self, ref: str, pid: int = 0, uid: int = -1, holder: str = "") -> Lease:
        self._check_open()
        check_holder_label(holder)
        with self._lock:
            mv = self.resolve(ref)
            held = self._leases_of.get(pid, 0)
            if held >= self.max_leases_per_pid:
                raise ResourceExhausted(
                    f"pid {pid} holds {held} leases, the most one process may (max_leases_per_pid): "
                    "close some before opening more",
                    pid=pid,
                    limit=self.max_leases_per_pid,
                )
            lease = Lease(new_lease_id(), ref, mv.name, mv.version, pid, uid, holder, seq=self.events.stamped)
            self._leases[lease.id] = lease
            self._lease_target[lease.id] = mv
            self._leases_of[pid] = held + 1
            mv.leases.add(lease.id)
            mv.relet_until = 0.0  # a holder is back: the version goes with its last lease, as before the restart
        log.info("lease.open", lease=lease.id, model=mv.key, pid=pid, holder=shorten(holder, 64))
        return lease

    def close_lease(self, lease_id: str) -> None:
        """Ends a lease; a retired version it was the last to hold is freed before this returns."""
        with self._txn() as fx:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return
            left = self._leases_of.pop(lease.pid) - 1
            if left:
                self._leases_of[lease.pid] = left
            self.tickets.drop_lease(lease_id)
            fx.log("info", "lease.closed", lease=lease_id, model=f"{lease.name}@{lease.version}")
            mv = self._lease_target.pop(lease_id, None)
            if mv is not None:
                mv.leases.discard(lease_id)
                self._maybe_retire(mv, fx)  # only while it is still the registered version
            self._changed.notify_all()

    def _lease(self, lease_id: str) -> tuple[Lease, ModelVersion]:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound("lease is unknown or has ended: open a new Lease stream", lease=lease_id)
        mv = self._lease_target.get(lease_id)
        if mv is None or mv.freed or self._versions.get(mv.key) is not mv:
            raise NotFound(f"{lease.name}@{lease.version} was unloaded (forced) while leased", lease=lease_id)
        return lease, mv

    def get_handles(self, lease_id: str, rank: int, key: str) -> Handles:
        """The rank's handles and a ticket for its fds, for the lease's holder: the caller must show the
        lease's key (given to the holder alone); the ticket is bound to the holder's process."""
        with self._lock:
            lease, mv = self._lease(lease_id)
            if not hmac.compare_digest(lease.key.encode(), key.encode("utf-8", "surrogateescape")):
                raise PermissionDenied(
                    f"lease {lease_id[:8]} is held by pid {lease.pid}: only its holder gets its handles",
                    lease=lease_id,
                )
            resident = mv.rank(rank)
            ticket = self.tickets.issue(lease_id, rank, lease.pid, lease.uid)
        return Handles(mv, resident, ticket.token, self.tickets.ttl)

    def redeem(self, token: str, pid: int, uid: int) -> tuple[Lease, list[int]]:
        """Exchanges a ticket for new fds of the rank's allocations; the caller sends and closes them.

        ``pid`` and ``uid`` are the kernel's word on who asks (SO_PEERCRED): anyone but the lease's
        holder is refused (PermissionDenied), the ticket stays unspent and the lease unchanged. The
        holder's uid is recorded at its first fetch; later ones must come under the same uid.
        """
        ticket = self.tickets.redeem(token, lambda t: check_holder(t, pid, uid))
        with self._lock:
            lease, mv = self._lease(ticket.lease_id)
            if lease.uid < 0:
                lease.uid = uid
            elif lease.uid != uid:  # a ticket issued before the uid was known
                raise PermissionDenied(f"lease {lease.id[:8]} is held under uid {lease.uid}", lease=lease.id)
            resident = mv.rank(ticket.rank)
            fds: list[int] = []
            try:
                for a in resident.allocations:
                    if a.handle_type.value != "CUDA_IPC":
                        fds.append(a.export_fd())
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
        return lease, fds

    def export_fds(self, key: str) -> list[tuple[int, int, int]]:
        """New fds of a READY fd-mode version's allocations, as (rank, index, fd); [] when it is gone.

        Exported under the lock, like ``redeem``'s, so that no free can run between the check and the export.
        The caller owns and closes the fds.
        """
        out: list[tuple[int, int, int]] = []
        with self._lock:
            mv = self._versions.get(key)
            if mv is None or mv.state is not State.READY or mv.freed or mv.mode is not AllocationMode.FD:
                return out
            try:
                for r in mv.ranks:
                    for i, a in enumerate(r.allocations):
                        out.append((r.rank, i, a.export_fd()))
            except BaseException:
                for *_, fd in out:
                    os.close(fd)
                raise
        return out

    def close(self) -> None:
        """Frees everything the daemon holds (clients' mappings keep their own pages)."""
        with self._txn() as fx:
            self._closed = True
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            # Each allocation once, in one pass (versions of the same files share theirs): asking per
            # version which of its allocations another still holds would cost the square of the registry.
            unique: dict[int, Allocation] = {}
            for mv in list(self._versions.values()):
                if mv.state is State.LOADING:
                    mv.cancel.set()  # its loader frees its memory once its readers have stopped
                    continue
                unique.update((id(a), a) for r in mv.ranks for a in r.allocations)
                mv.ranks = []
            fx.free(unique.values())
            self._versions.clear()
            self._aliases.clear()
            self._leases.clear()
            self._lease_target.clear()
            self._leases_of.clear()
        try:
            self.backend.close()
        except Exception as exc:  # closing must not hide the shutdown
            log.warning("backend.close_failed", error=str(exc))

    def adopt_version(self, mv: ModelVersion, aliases: Iterable[str] = ()) -> None:
        """Registers a version rebuilt from restored allocations (daemon restart).

        A retired one stays retired: it waits ``relet_grace`` seconds for the clients that held it
        to lease it again (and what is left of its keep-previous hold), then goes with its last lease.
        """
        with self._txn():
            if mv.key in self._versions:
                raise AlreadyExists(f"{mv.key} is already registered")
            mv.state = State.READY
            self._versions[mv.key] = mv
            for a in aliases:
                self._aliases[a] = mv.key
            if not mv.retire:
                self._unhold(mv)
                return
            now, left = time.monotonic(), mv.held_until_unix - time.time()
            if mv.previous_of and left > 0:
                mv.hold_until = now + left
            else:
                self._unhold(mv)
            mv.relet_until = now + self.relet_grace
            self._recheck_later(mv, self.relet_grace)
            if mv.hold_until:
                self._recheck_later(mv, left)
