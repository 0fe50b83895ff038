"""Surviving a daemon restart: the fd store and the state file beside it (restoring from both is
restore.py).

Under systemd each exportable allocation's fd goes to the service manager's fd store once its
version is READY, so even a SIGKILL keeps the memory alive; the state file (registry, tensor
tables, aliases) is rewritten after every change. On start the daemon gets the fds back, checks
them against the state file and serves again without touching storage. Without an fd store the
state file still lets a restart reload the same versions from storage, and it says so.

The state file belongs to one socket: its name derives from the socket's and it records the
socket's path. Only the daemon holding that socket's lock reads or writes it, and a file that
names another socket is neither served from nor overwritten.

All of it runs on the persister's own thread: the registry's events only queue work for it, so an
fsync or a wedged service manager never holds up a registry change or an RPC.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from hotweights.errors import HotweightsError
from hotweightsd.core.backend import AllocationMode
from hotweightsd.core.events import Event, EventKind
from hotweightsd.core.layout import Placement
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, State
from hotweightsd.persist import statefile, systemd

log = structlog.get_logger("hotweightsd.persist.fdstore")
STATE_SUFFIX = ".state.json"


def state_path(socket: str, state_dir: str = "") -> Path:
    """``<state_dir or the socket's directory>/<socket's file name>.state.json``."""
    sock = Path(socket)
    return Path(state_dir or sock.parent) / (sock.name + STATE_SUFFIX)


def fd_name(key: str, rank: int, index: int) -> str:
    """The version's fd-store name for one allocation: readable when systemd takes it as it is.

    A key systemd would refuse (too long for an FDNAME, or a character it does not accept) is
    named by its hash instead; the state file records the names, so a restore never derives them.
    """
    name = f"hw/{key}/{rank}/{index}"
    try:
        return systemd.check_fdname(name)
    except HotweightsError:
        return f"hw/#{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:40]}/{rank}/{index}"


def _encode_version(mv: ModelVersion, names: list[list[str]], shares_allocations: str = "") -> dict:
    return {
        "name": mv.name,
        "version": mv.version,
        "source": mv.source,
        "world_size": mv.world_size,
        "mode": mv.mode.value,
        "created": mv.created,
        "load_seconds": mv.load_seconds,
        "load_path": mv.load_path,
        "retire": mv.retire,
        "held_until": mv.held_until_unix,
        "previous_of": mv.previous_of,
        "bytes_total": mv.bytes_total,
        "content": mv.content.to_json() if mv.content else None,
        "shares": mv.shares,
        "layout": mv.layout,
        # The key of a version encoded before this one that holds the very same allocations (loaded
        # from the same files): a restore gives this one that version's memory again, so it stays
        # resident (and counted) once. Its own fds are in the store all the same.
        "shares_allocations": shares_allocations,
        "ranks": [
            {
                "rank": r.rank,
                "device": r.device,
                "files": r.layout.files,
                "allocation_sizes": r.layout.allocation_sizes,
                "handle_types": [a.handle_type.value for a in r.allocations],
                "fd_names": names[i],
                "placements": [_placement_row(p) for p in r.layout.placements],
                # An engine layout's served table (absent: the placements are what is served).
                **({"served": [_placement_row(p) for p in r.layout.served]} if r.layout.served is not None else {}),
            }
            for i, r in enumerate(mv.ranks)
        ],
    }


def _placement_row(p: Placement) -> list:
    return [p.name, p.dtype, p.served_dtype, list(p.shape), p.allocation, p.offset, p.nbytes, p.file, p.file_offset]


def placement_from_row(row: list) -> Placement:
    return Placement(row[0], row[1], row[2], tuple(row[3]), row[4], row[5], row[6], row[7], row[8])


class _Flush:
    def __init__(self, save: bool = False) -> None:
        self.save = save
        self.done = threading.Event()


_STOP = object()
# Events after which the state file is rewritten (a version's birth alone changes nothing to restore).
_SAVE_ON = {EventKind.VERSION_READY, EventKind.VERSION_FREED, EventKind.ALIAS_MOVED, EventKind.ALIAS_REMOVED}


class Persister:
    """Keeps the fd store and the state file in step with the registry, on its own thread.

    Subscribed to the registry's events, it only queues them; its thread sends the fd store's
    messages in event order and writes the state file once for all the events it found queued.
    """

    def __init__(
        self,
        manager: ModelManager,
        state_path: Path,
        socket: str,
        fdstore: bool,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.m = manager
        self.state_path = state_path
        self.socket = os.path.abspath(socket)
        self.fdstore = fdstore
        self.refused = ""  # why the state file is not this daemon's to write; "" when it is
        self.writes = 0
        # Told once if the thread ever ends other than by close(): nothing is persisted after that.
        self.on_failure = on_failure or (lambda exc: None)
        self.failure: BaseException | None = None
        self._stored: dict[str, list[str]] = {}  # version key -> fd names in the store
        # Versions (and their aliases) the state file named that a restart reloads from storage: kept
        # in every save until their reload settles, so a crash during the reload loses none of them.
        self._pending: dict[str, dict] = {}  # key -> its entry, as the state file had it, without fds
        self._pending_aliases: dict[str, str] = {}  # alias -> key
        self._pending_lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hw-persist", daemon=True)
        self._unsubscribe = manager.events.subscribe(self._queue.put)

    def adopted(self, key: str, names: list[str]) -> None:
        self._stored[key] = names

    def carry(self, versions: list[dict], aliases: dict[str, str]) -> None:
        """Keeps ``versions`` (state-file entries to reload) and their aliases in the state file until
        ``settled``. Their fds are not in the store: the entries name none, so a later restore reloads them."""
        with self._pending_lock:
            for v in versions:
                key = f"{v['name']}@{v['version']}"
                entry = {**v, "shares_allocations": "", "ranks": [{**r, "fd_names": []} for r in v["ranks"]]}
                self._pending[key] = entry
                self._pending_aliases.update((a, k) for a, k in aliases.items() if k == key)

    def settled(self, key: str) -> None:
        """The reload of ``key`` is over (loaded, aliased, or failed): the registry alone speaks for it now."""
        with self._pending_lock:
            if self._pending.pop(key, None) is None:
                return
            for a in [a for a, k in self._pending_aliases.items() if k == key]:
                del self._pending_aliases[a]
        self._queue.put(_Flush(save=True))

    def refuse(self, reason: str) -> None:
        """Never writes the state file (it belongs to another socket)."""
        self.refused = reason

    def start(self) -> None:
        """Starts the thread, which first writes the state as it is now."""
        self._queue.put(_Flush(save=True))
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until everything queued before this call has been carried out."""
        if self.failure is not None:
            return False
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stops listening, carries out what is queued, and stops the thread."""
        self._unsubscribe()
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.failure = exc
            log.critical("persist.thread_died", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self.on_failure(exc)

    def _serve(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            dirty = False
            for item in batch:
                if isinstance(item, Event):
                    dirty |= self._apply_logged(item)
                elif isinstance(item, _Flush):
                    dirty |= item.save
            if dirty:
                self._save_logged()
            for item in batch:
                if isinstance(item, _Flush):
                    item.done.set()
            if any(item is _STOP for item in batch):
                return

    def _apply_logged(self, ev: Event) -> bool:
        key = f"{ev.name}@{ev.version}"
        try:
            if ev.kind is EventKind.VERSION_READY:
                self._store(key)
            elif ev.kind is EventKind.VERSION_FREED:
                self._forget(key)
        except HotweightsError as exc:
            log.error("persist.failed", kind=ev.kind.value, model=key, error=str(exc))
        except Exception as exc:  # a bug in one item must not end persisting for every later one
            log.error(
                "persist.failed", kind=ev.kind.value, model=key, error=f"{type(exc).__name__}: {exc}", exc_info=True
            )
        return ev.kind in _SAVE_ON

    def _store(self, key: str) -> None:
        if not self.fdstore:
            return
        exported = self.m.export_fds(key)
        if not exported:
            if any(v.key == key and v.mode is not AllocationMode.FD for v in self.m.versions()):
                log.info("persist.not_stored", model=key, reason="legacy IPC memory dies with the daemon")
            return  # otherwise freed again before this thread got to it
        names: list[str] = []
        try:
            for rank, index, fd in exported:
                name = fd_name(key, rank, index)
                systemd.store_fds(name, [fd])
                names.append(name)
        except BaseException:
            # All or nothing: the state file then records the version as one to reload from storage,
            # never as one whose fds the store holds only in part.
            for name in names:
                try:
                    systemd.remove_fds(name)
                except HotweightsError as exc:
                    log.error("persist.remove_failed", model=key, fd=name, error=str(exc))
            raise
        finally:
            for *_, fd in exported:
                os.close(fd)
        self._stored[key] = names
        log.info("persist.stored", model=key, fds=len(names))

    def _forget(self, key: str) -> None:
        for n in self._stored.pop(key, []):
            systemd.remove_fds(n)

    def snapshot(self) -> dict:
        versions = []
        encoded: dict[tuple[tuple[int, ...], ...], str] = {}  # a stored version's allocations, by identity -> key
        for mv in self.m.versions():
            if mv.state is not State.READY or mv.freed:
                continue
            stored = mv.key in self._stored
            names = [
                [fd_name(mv.key, r.rank, i) for i in range(len(r.allocations))] if stored else [] for r in mv.ranks
            ]
            identity = tuple(tuple(id(a) for a in r.allocations) for r in mv.ranks)
            sharer = encoded.get(identity, "") if stored else ""
            if stored and not sharer:
                encoded[identity] = mv.key
            versions.append(_encode_version(mv, names, sharer))
        aliases = self.m.aliases()
        with self._pending_lock:
            written = {f"{v['name']}@{v['version']}" for v in versions}
            versions += [v for k, v in self._pending.items() if k not in written]
            for a, k in self._pending_aliases.items():
                aliases.setdefault(a, k)
        return {"socket": self.socket, "versions": versions, "aliases": aliases}

    def save(self) -> None:
        if self.refused:
            return
        statefile.save(self.state_path, self.snapshot())
        self.writes += 1

    def _save_logged(self) -> None:
        try:
            self.save()
        except HotweightsError as exc:
            log.error("persist.save_failed", path=str(self.state_path), error=str(exc))
        except Exception as exc:  # the next change writes the state file again
            log.error(
                "persist.save_failed", path=str(self.state_path), error=f"{type(exc).__name__}: {exc}", exc_info=True
            )
