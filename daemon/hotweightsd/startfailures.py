"""The loads at start that failed, as ``status`` shows them, until the operator has mended each.

A failure stays a *current* failure only until what it failed to make exists: otherwise ``status`` and
``doctor`` (which FAILs on any) would report it until the next restart, after the operator followed the
fix it names. What mends an entry is read from the manager's events, so the list the servicer shows
stays a plain list and nothing is asked of the manager (its lock) on the event's delivering thread:

- a load of ``NAME@VERSION`` (a reload, a ``[[preload]]`` with a version): that version turns READY
  again, and each alias the load was to set names it;
- a ``[[preload]]`` without a version (its version is its content's fingerprint, unknown until it
  loads): the version a later load of the same path registers turns READY, and each of its aliases
  names it; another version of NAME (another preload's, an operator's) mends nothing;
- an alias the state file named without its version: the alias exists again.

Only what happens after the failure counts (a version already READY when a preload of it was skipped
for other content does not mend it), except the aliases the load had set before it failed; an entry
once mended is gone for good: status reports the start's failures that still stand, not the current
state of each target.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hotweightsd.core.events import Event, EventBus, EventKind


@dataclass
class _Entry:
    message: str
    name: str  # "" for a dropped alias: only the alias's return mends it
    version: str | None  # None: not known yet, learnt from a later load of ``path``
    aliases: tuple[str, ...]
    after: int  # events stamped up to this one happened before the failure
    moved: set[str] = field(default_factory=set)  # aliases since pointed at a matching version
    path: str = ""  # the path the load asked for, as given (a later load of it resolves it again)
    fixed_version: bool = False  # the item named its version; otherwise it is the content's, learnt

    def _resolves_to(self, loaded: str) -> bool:
        # Resolved now, not at the failure: the operator may have put the model there through a link,
        # or repointed one. A few lstat calls, only for a load of this entry's name.
        return os.path.realpath(self.path) == loaded

    def matches(self, ev: Event) -> bool:
        return ev.name == self.name and self.version is not None and ev.version == self.version

    def mended_by(self, ev: Event) -> bool:
        if ev.seq <= self.after:
            return False
        if not self.name:
            return ev.kind is EventKind.ALIAS_MOVED and ev.alias in self.aliases
        if ev.kind is EventKind.VERSION_ADDED and ev.name == self.name and self.path and self._resolves_to(ev.message):
            if not self.fixed_version and ev.version != self.version:
                self.version = ev.version  # the content now at the path: its version is the one to wait for
                self.moved.clear()
        if ev.kind is EventKind.ALIAS_MOVED and ev.alias in self.aliases:
            if self.matches(ev):
                self.moved.add(ev.alias)
            else:  # moved elsewhere since: the load's alias does not name it
                self.moved.discard(ev.alias)
        elif ev.kind is EventKind.ALIAS_REMOVED:
            self.moved.discard(ev.alias)
        if self.aliases:
            return self.moved.issuperset(self.aliases)
        return ev.kind is EventKind.VERSION_READY and self.matches(ev)


class StartFailures:
    """Keeps ``shown`` (the servicer's ``start_failures``) to the failures not yet mended."""

    def __init__(self, shown: list[str], events: EventBus) -> None:
        self._shown = shown
        self._events = events
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self.unsubscribe: Callable[[], None] = events.subscribe(self._seen)

    def load_failed(self, item: dict, message: str, aliased: Iterable[str] = ()) -> None:
        """A reload or [[preload]] item ({name, path, version?, aliases}) failed to load at start;
        ``aliased``: those of its aliases the load had pointed at its version before it failed."""
        named = item.get("version") or None
        entry = _Entry(
            message,
            item["name"],
            named or item.get("loaded_version") or None,
            tuple(item.get("aliases", ())),
            0,
            path=os.path.abspath(os.path.expanduser(item["path"])) if item.get("path") else "",
            fixed_version=named is not None,
        )
        entry.moved.update(a for a in aliased if a in entry.aliases)
        self._add(entry)

    def aliases_dropped(self, dropped: Iterable[tuple[str, str]]) -> None:
        """(alias, message) for each alias the state file named without its version."""
        for alias, message in dropped:
            self._add(_Entry(message, "", None, (alias,), 0))

    def _add(self, entry: _Entry) -> None:
        with self._lock:
            entry.after = self._events.stamped
            self._entries.append(entry)
            self._show()

    def _seen(self, ev: Event) -> None:
        with self._lock:
            if not self._entries:
                return
            kept = [e for e in self._entries if not e.mended_by(ev)]
            if len(kept) != len(self._entries):
                self._entries = kept
                self._show()

    def _show(self) -> None:
        # One slice assignment: the servicer's status copies the list from its own threads.
        self._shown[:] = [e.message for e in self._entries]
