"""Aliases and what moves them: a swap's move with the previous version kept for a rollback or
retired, rollbacks, and the drain that frees a version before a swap loads its successor. Part of
``ModelManager`` (manager.py)."""

from __future__ import annotations

import time

import structlog

from hotweights.errors import Aborted, DeadlineExceeded, FailedPrecondition, HotweightsError, InvalidArgument, shorten
from hotweightsd.core.events import EventKind
from hotweightsd.core.registry import ModelVersion, State, check_name, split_ref
from hotweightsd.core.state import DrainSwapFailure, ManagerState, gib

log = structlog.get_logger("hotweightsd.manager")


class AliasesMixin(ManagerState):
    def set_alias(self, alias: str, target: str, *, create: bool = False) -> tuple[str, str]:
        """Points ``alias`` at ``NAME@VERSION`` (READY); returns (old key or "", new key).

        An alias that does not exist is NotFound (naming the known ones) unless ``create``.
        """
        check_name("alias", alias)
        with self._txn() as fx:
            if any(v.name == alias for v in self._versions.values()):
                raise InvalidArgument(f"{shorten(alias)!r} is a model name; aliases and model names must differ")
            if not create:
                self.require_alias(alias)
            name, version = split_ref(target)
            if version is None:
                raise InvalidArgument(f"alias target must be NAME@VERSION, got {shorten(target)!r}")
            mv = self.get(name, version)
            if mv.state is not State.READY:
                raise FailedPrecondition(
                    f"cannot point alias {alias!r} at {mv.key}: it is {mv.state.value}"
                    + (f" ({mv.error})" if mv.error else ""),
                    ref=mv.key,
                    state=mv.state.value,
                )
            old = self._aliases.get(alias, "")
            self._aliases[alias] = mv.key
            self._swap_failed.pop(alias, None)
            mv.retire = False
            self._unhold(mv)
            old_version = old.partition("@")[2] if old else ""
            fx.publish(EventKind.ALIAS_MOVED, mv.name, version=mv.version, alias=alias, old_version=old_version)
            fx.log("info", "alias.moved", alias=alias, old=old, new=mv.key)
        return old, mv.key

    def remove_alias(self, alias: str) -> str:
        """Deletes ``alias``; a previous version kept for its rollback is retired with it."""
        check_name("alias", alias)
        with self._txn() as fx:
            key = self.require_alias(alias, creatable=False)
            del self._aliases[alias]
            self._swap_failed.pop(alias, None)
            name, _, version = key.partition("@")
            fx.publish(EventKind.ALIAS_REMOVED, name, version=version, alias=alias)
            self.release_kept(alias)
        return key

    def check_drainable(self, key: str, alias: str | None) -> None:
        """Refuses to drain (free) ``key`` while an alias other than ``alias`` names it."""
        with self._lock:
            others = [a for a in self.aliases_of(key) if a != alias]
        if others:
            named = ", ".join(repr(a) for a in others)
            raise FailedPrecondition(
                f"cannot drain {key}: alias(es) {named} name it too, and a drain frees it; point them "
                f"elsewhere first, or swap side by side (nothing was changed)",
                ref=key,
                aliases=others,
            )

    def move_alias_from(
        self,
        alias: str,
        key: str,
        expect: str,
        *,
        create: bool = False,
        loaded_here: bool = True,
        joins: int | None = None,
    ) -> None:
        """A drain swap's last step: points ``alias`` at ``key`` only if it still names ``expect`` (the
        version it drained), checked and moved in one step. Where it was moved or removed while the swap
        loaded, it is left so (that move was answered as done), ``key`` is retired when the swap loaded
        it (``loaded_here``; freed when its last lease ends, unless something names it; a version that
        was resident already, or that another load joined since ``joins`` was counted, is someone else's too)
        and FailedPrecondition says what happened."""
        with self._txn() as fx:
            now = self._aliases.get(alias)
            if now != expect:
                mv = self._versions.get(key)
                joined = mv is not None and joins is not None and mv.joins != joins
                retired = loaded_here and mv is not None and not joined and not self.aliases_of(key)
                if retired and mv is not None:
                    mv.retire = True
                    self._maybe_retire(mv, fx)
                where = f"moved to {now}" if now else "removed"
                fx.log("info", "swap.alias_moved_meanwhile", alias=alias, expected=expect, now=now or "", new=key)
                raise FailedPrecondition(
                    f"alias {alias!r} was {where} while this drain swap loaded {key}; it was left as it is"
                    + (f", and {key} was retired (freed when its last lease ends)" if retired else ""),
                    alias=alias,
                    ref=key,
                    now=now or "",
                )
            self.set_alias(alias, key, create=create)

    def is_spare(self, mv: ModelVersion) -> bool:
        """Whether ``mv`` is kept only for an alias's rollback (retired, held)."""
        with self._lock:
            return bool(mv.retire and mv.previous_of)

    def drain_swap_failed(self, alias: str, old: ModelVersion, exc: BaseException) -> None:
        """Records why ``alias`` names nothing, when its drain swap freed ``old`` and the next version
        then failed: attaches through it get that reason, not a "retry shortly" forever."""
        err = exc.message if isinstance(exc, HotweightsError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            if self._aliases.get(alias) == old.key and old.key not in self._versions:
                self._swap_failed[alias] = DrainSwapFailure(
                    old.key,
                    old.layout,
                    f"alias {alias!r} names {old.key}, which its drain swap freed before the next version "
                    f"failed ({shorten(err, 200)}): point it at a loaded version "
                    f"(`hotweights alias {alias} NAME@VERSION`) or swap it again",
                )

    def drain_swap_begins(self, alias: str) -> None:
        """Forgets an earlier drain swap's failure: while this one loads, the alias is between versions."""
        with self._lock:
            self._swap_failed.pop(alias, None)

    def release_kept(self, alias: str) -> list[str]:
        """Ends the holds of the versions a swap kept for ``alias``'s rollback: each is freed now, or
        when its last lease ends. Returns their keys."""
        with self._txn() as fx:
            kept = [v for v in self._versions.values() if v.previous_of == alias]
            for mv in kept:
                self._unhold(mv)
                self._maybe_retire(mv, fx)
        return [mv.key for mv in kept]

    def keep_allowed(self, mv: ModelVersion) -> tuple[bool, str]:
        """Whether the default keeps the previous version after a swap to ``mv``, and why not.

        Kept when the daemon's keep_previous is on and every device ``mv`` lies on has room for
        another version of its size, counting only the memory ``mv`` holds alone (one sharing the
        previous version's memory costs nothing more). Queries the backend: call it without the lock.
        """
        if not self.keep_previous:
            return False, "keep_previous is off"
        need: dict[int, int] = {}
        with self._lock:
            for device, a in self._own(mv):
                need[device] = need.get(device, 0) + a.size
        free = {d.index: d.free for d in self.backend.devices()}
        for dev, n in sorted(need.items()):
            if free.get(dev, 0) < n:
                where = "host memory" if self.backend.shared_device else f"device {dev}"
                return False, (
                    f"{gib(free.get(dev, 0))} free on {where}, below the {gib(n)} of {mv.key} "
                    "(keep-previous falls back to no when memory is short)"
                )
        return True, ""

    def move_alias(self, alias: str, key: str, *, keep: bool, why_not: str = "", create: bool = False) -> str:
        """Points ``alias`` at ``key`` and, in the same step, keeps the version it moved away from
        (``keep``: resident, unaliased, for ``keep_previous_seconds``, the alias's rollback target)
        or retires it (freed when its last lease ends). Returns what became of the previous version."""
        with self._txn() as fx:
            old_key, _ = self.set_alias(alias, key, create=create)
            old = self._versions.get(old_key) if old_key and old_key != key else None
            if old is None:
                return ""
            for mv in [v for v in self._versions.values() if v.previous_of == alias and v is not old]:
                self._unhold(mv)  # one previous version per alias: the newest
                self._maybe_retire(mv, fx)
            old.retire = True
            if keep and old.state is State.READY and not old.freed:
                old.hold_until = time.monotonic() + self.keep_previous_seconds
                old.held_until_unix = time.time() + self.keep_previous_seconds
                old.previous_of = alias
                self._recheck_later(old, self.keep_previous_seconds)
                note = (
                    f"kept {old_key} resident for {self.keep_previous_seconds:g}s "
                    f"(`hotweights rollback {alias}` moves back)"
                )
            else:
                self._unhold(old)
                note = f"retired {old_key}: freed when its last lease ends" + (
                    f"; not kept: {why_not}" if why_not else ""
                )
                self._maybe_retire(old, fx)
            fx.log("info", "alias.previous", alias=alias, previous=old_key, kept=bool(old.previous_of), note=note)
        return note

    def rollback(self, alias: str) -> tuple[ModelVersion, str, str]:
        """Points ``alias`` back at the previous version a swap kept resident; reads and allocates nothing.

        The version it moves away from is kept in turn (so a second rollback undoes the first) when
        keep_previous is on, else retired. Returns (the version now aliased, the old key, what became of it).
        """
        check_name("alias", alias)
        with self._txn():
            current = self.require_alias(alias, creatable=False)
            prev = next((v for v in self._versions.values() if v.previous_of == alias), None)
            if prev is None or prev.state is not State.READY or prev.freed or prev.key == current:
                raise FailedPrecondition(
                    f"alias {shorten(alias)!r} has no previous version kept resident to roll back to "
                    f"(a swap keeps it for keep_previous_seconds={self.keep_previous_seconds:g}); "
                    f"swap it to a NAME@VERSION instead",
                    alias=alias,
                    current=current,
                )
            note = self.move_alias(alias, prev.key, keep=self.keep_previous, why_not="keep_previous is off")
        return prev, current, note

    def retire(self, key: str) -> None:
        """Marks a version to be freed when its last lease ends (now, if none)."""
        with self._txn() as fx:
            mv = self._versions.get(key)
            if mv is not None:
                mv.retire = True
                self._maybe_retire(mv, fx)

    def drain(self, mv: ModelVersion, timeout: float, alias: str | None = None) -> None:
        """Marks ``mv`` DRAINING, waits for its leases to end, then frees it.

        ``alias``: the alias a drain swap moves off ``mv``; any other alias naming ``mv`` refuses the
        drain (FailedPrecondition, nothing changed), as an unload without force is refused: freeing it
        would leave that alias naming nothing. On timeout the version goes back to READY and
        DeadlineExceeded is raised: nothing changed. A version unloaded (forced) while it drains ends
        the wait at once with Aborted.
        """
        with self._txn() as fx:
            if mv.state is not State.READY:
                raise FailedPrecondition(f"{mv.key} is {mv.state.value}; only a READY version can drain")
            self.check_drainable(mv.key, alias)
            mv.state = State.DRAINING
            fx.publish(
                EventKind.VERSION_DRAINING, mv.name, version=mv.version, message=f"{len(mv.leases)} lease(s) to end"
            )
        deadline = time.monotonic() + timeout
        with self._txn() as fx:
            while True:
                if self._versions.get(mv.key) is not mv:
                    raise Aborted(f"{mv.key} was unloaded while it drained; the swap loaded nothing", ref=mv.key)
                if not mv.leases:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    mv.state = State.READY
                    n = len(mv.leases)
                    raise DeadlineExceeded(
                        f"drain of {mv.key} timed out after {timeout:g}s with {n} lease(s) still live; "
                        f"nothing was changed",
                        ref=mv.key,
                        leases=n,
                    )
                self._changed.wait(min(left, 0.5))
            self._drop(mv, fx)
