"""The model manager: loads, leases, handles, aliases, swaps and frees, over one MemoryBackend.

Every public method is synchronous and thread-safe; the servicer runs them in worker threads,
never on its event loop. State changes under one registry lock, effects after it: a method decides
under the lock which allocations to free and which events to publish (an ``_Effects`` list), and
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
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from hotweights.errors import (
    Aborted,
    AlreadyExists,
    ContentMismatch,
    DeadlineExceeded,
    FailedPrecondition,
    HotweightsError,
    InsufficientMemory,
    InvalidArgument,
    LeaseHeld,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    shorten,
)
from hotweights.format.checkpoint import Checkpoint, HeaderLimits, open_checkpoint
from hotweights.format.engine_layout import RankRecipe, check_layout, rank_recipe
from hotweights.format.source import DEFAULT_MAX_FILES, read_small
from hotweightsd.core import faults
from hotweightsd.core.backend import Allocation, AllocationMode, MemoryBackend
from hotweightsd.core.content import ContentId, content_of
from hotweightsd.core.events import EventBus, EventKind
from hotweightsd.core.layout import RankLayout, plan_rank
from hotweightsd.core.leases import (
    MAX_LEASES_PER_PID,
    Lease,
    TicketBook,
    check_holder,
    check_holder_label,
    new_lease_id,
)
from hotweightsd.core.registry import ModelVersion, ResidentRank, State, check_name, split_ref
from hotweightsd.core.roots import ModelRoots

log = structlog.get_logger("hotweightsd.manager")

VERIFY_LEVELS = ("default", "none", "fast", "full")
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


@dataclass(frozen=True)
class Handles:
    version: ModelVersion
    rank: ResidentRank
    ticket: str
    ttl: float


class LoadStart(NamedTuple):
    version: ModelVersion
    run: Callable[[], ModelVersion]
    # True when ``version`` was already loaded (or loading) from the same content: ``run`` reads nothing.
    already_loaded: bool


class _Effects:
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


class ModelManager:
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
    def _txn(self) -> Iterator[_Effects]:
        """Holds the registry lock for a decision; runs the effects it queued once the lock is released.

        Nested in another on the same thread, it shares the outer one's effects (run at its end).
        """
        outer: _Effects | None = getattr(self._local, "effects", None)
        if outer is not None:
            with self._lock:
                yield outer
            return
        fx = _Effects(self.events)
        try:
            with self._lock:
                self._local.effects = fx
                try:
                    yield fx
                finally:
                    self._local.effects = None
        finally:
            fx.run()

    # ---- reading state -------------------------------------------------------------------

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

    # ---- loading --------------------------------------------------------------------------

    def load(self, name: str, path: str, **kw) -> ModelVersion:
        mv, run = self.begin_load(name, path, **kw)
        run()
        return mv

    def begin_load(self, name: str, path: str, **kw: Any) -> tuple[ModelVersion, Callable[[], ModelVersion]]:
        """``start_load`` as (version, the function that reads it)."""
        start = self.start_load(name, path, **kw)
        return start.version, start.run

    def start_load(
        self,
        name: str,
        path: str,
        version: str | None = None,
        alias: str | None = None,
        verify: str | None = None,
        mode: AllocationMode = AllocationMode.FD,
        device_map: Iterable[int] | None = None,
        layout: str = "",
    ) -> LoadStart:
        """Validates, admits and registers a version (LOADING) and returns it with the function that reads it.

        Everything that can be refused is refused here, before any tensor byte is read. A version
        that is already loaded (or loading) from the same content is returned as it is, with
        ``already_loaded`` set: nothing is verified, read or allocated, and its ``run`` only waits
        for it to be READY and points ``alias`` at it. The same version from other content is a
        ``ContentMismatch``. A new version of the very files another READY version was read from
        (in the same mode, on the devices asked for) is registered READY on that version's memory
        (``shares``): it is verified, but nothing is admitted, read or allocated. One of the very files
        another version is still reading is registered LOADING, and its ``run`` waits for that read and
        takes its memory, or, where that read fails or is unloaded, reads the files itself. Without ``version`` the
        version is the checkpoint's fingerprint (and the layout's name), so the same checkpoint loaded again is
        the same version. ``layout`` ("" or one of ``engine_layout.LAYOUTS``): the engine layout the rank's
        tensors are placed and served in; a version is shared only with one in the same layout.
        """
        self._check_open()
        check_name("model name", name)
        if alias:
            check_name("alias", alias)
        if not path:
            raise InvalidArgument("no checkpoint path given")
        layout = check_layout(layout)
        faults.hit("load.header", path)
        ckpt = self.open_checkpoint(path)
        try:
            start = self._start_load(ckpt, name, version, alias, verify, mode, device_map, layout)
        except BaseException:
            ckpt.close()
            raise
        if start.already_loaded or start.version.state is State.READY:  # nothing to read
            ckpt.close()
            return start

        def run() -> ModelVersion:
            try:
                return start.run()
            finally:
                ckpt.close()

        return start._replace(run=run)

    def open_checkpoint(self, path: str) -> Checkpoint:
        """The checkpoint at ``path``, its files opened once, inside the model roots; the caller closes it."""
        return open_checkpoint(
            path, self.roots.check if self.roots.confined else None, self.max_checkpoint_files, self.header_limits
        )

    def _start_load(
        self,
        ckpt: Checkpoint,
        name: str,
        version: str | None,
        alias: str | None,
        verify: str | None,
        mode: AllocationMode,
        device_map: Iterable[int] | None,
        layout: str,
    ) -> LoadStart:
        version = check_name("version", version) if version else ckpt.fingerprint() + (f"-{layout}" if layout else "")
        content = content_of(ckpt)
        with self._lock:
            old = self._existing(f"{name}@{version}", content, layout)
        if old is not None:
            return self._rejoin(old, alias)
        # Verified like any load, also when it will share: what a load refuses must not depend on what
        # else is resident (an explicit verify=full is not skipped because another name loaded the
        # same files with verify=none). Only tensor data is never read again.
        recipes = self.layout_recipes(ckpt, layout)  # before verify: a checkpoint the layout refuses is not hashed
        self.verify(ckpt, verify)
        wanted = list(device_map or [])
        while True:
            shared = self._share(ckpt, name, version, alias, content, mode, wanted, layout, recipes)
            if shared is not None:
                return shared
            layouts, devices = self._plan(ckpt, wanted, recipes)
            mv = ModelVersion(
                name=name,
                version=version,
                source=str(ckpt.path),
                world_size=ckpt.world_size,
                mode=mode,
                bytes_total=sum(lay.nbytes for lay in layouts),
                content=content,
                layout=layout,
                devices=devices,
            )
            with self._lock:
                self._check_names(name, alias)
                old = self._existing(mv.key, content, layout)  # a concurrent load of the same version may have won
                # Another name may have registered the same files since _share looked: registering a
                # second reader now would read them twice, so the decision is taken again.
                raced = old is None and self._share_source(content, mode, wanted, ckpt.world_size, layout) is not None
                if old is None and not raced:
                    self._versions[mv.key] = mv
            if old is not None:
                return self._rejoin(old, alias)
            if not raced:
                break
        try:
            self._admit_and_allocate(mv, layouts, devices)
        except BaseException as exc:
            with self._txn() as fx:
                self._fail(mv, exc, fx, publish=False)
                if self._versions.get(mv.key) is mv:
                    del self._versions[mv.key]
            self._settle(mv)
            raise
        with self._txn() as fx:
            fx.publish(EventKind.VERSION_ADDED, name, version=version, message=str(ckpt.path))
        log.info(
            "load.admitted",
            model=mv.key,
            path=str(ckpt.path),
            ranks=ckpt.world_size,
            bytes=mv.bytes_total,
            devices=devices,
        )
        return LoadStart(mv, lambda: self._fill(mv, alias), False)

    def _plan(
        self, ckpt: Checkpoint, wanted: list[int], recipes: list[RankRecipe]
    ) -> tuple[list[RankLayout], list[int]]:
        """Where each rank of ``ckpt`` goes (its device) and how it lies in its allocations."""
        devices = self._place(ckpt.world_size, wanted)
        layouts = [
            plan_rank(r, self.backend.granularity(devices[r.rank]), self.backend.max_allocation(), recipes[r.rank])
            for r in ckpt.ranks
        ]
        return layouts, devices

    def layout_recipes(self, ckpt: Checkpoint, layout: str) -> list[RankRecipe]:
        """Per rank, what ``layout`` fuses, pads and leaves out (nothing without a layout); refuses a
        checkpoint the layout does not fit before anything is allocated."""
        if not layout:
            return [RankRecipe() for _ in ckpt.ranks]
        folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        config = self._side_json(folder / "config.json", layout, required=True) or {}
        # Written by the offline converter in this layout for this many ranks: its vocabulary is padded already.
        marker = self._side_json(folder / "hotweights-layout.json", layout, required=False) or {}
        prepadded = marker.get("engine") == layout and marker.get("tp") == ckpt.world_size
        return [
            rank_recipe(
                layout,
                config,
                ckpt.world_size,
                r.rank,
                {t.name: (t.dtype.name, t.shape) for h in r.files for t in h.tensors},
                prepadded,
            )
            for r in ckpt.ranks
        ]

    def _side_json(self, path: Path, layout: str, required: bool) -> dict | None:
        """A JSON object beside the checkpoint, read inside the model roots; None when absent and not ``required``."""
        try:
            doc = json.loads(
                read_small(path, self.roots.check if self.roots.confined else None, 1 << 20),
                parse_constant=_no_constant,
            )
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except NotFound:
            if not required:
                return None
            raise InvalidArgument(
                f"layout {layout}: no {path.name} beside the checkpoint ({path}); the layout is cut from it",
                path=str(path),
            ) from None
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(f"layout {layout}: {path} is not valid JSON ({exc})", path=str(path)) from None
        return doc

    def _admit_and_allocate(self, mv: ModelVersion, layouts: list[RankLayout], devices: list[int]) -> None:
        """Refuses ``mv`` where it does not fit, else allocates its ranks; on failure what was allocated
        stays on ``mv`` for ``_fail`` to free."""
        with self._admit_lock:
            self._admit(mv, layouts, devices)
            self._allocate(mv, layouts, devices)

    def _check_names(self, name: str, alias: str | None) -> None:
        """Refuses a model name that is an alias, or an alias that is a model's name (lock held)."""
        if alias and alias in {v.name for v in self._versions.values()} | {name}:
            raise InvalidArgument(
                f"alias {shorten(alias)!r} is the name of a model; aliases and model names must differ"
            )
        if name in self._aliases:
            raise InvalidArgument(f"{shorten(name)!r} is an alias; a model cannot share its name")

    def _sharable(
        self,
        content: ContentId,
        mode: AllocationMode,
        device_map: list[int],
        world: int,
        layout: str,
        state: State = State.READY,
    ) -> ModelVersion | None:
        """A version in ``state`` read from the very same files, in the same mode and on the devices
        ``device_map`` asks for (any, without one) (lock held). READY: its memory holds exactly what a load
        would read; the oldest such version, so that every sharer names the same one. LOADING: one reading
        the files itself (not one waiting on another's read)."""
        candidates = [
            v
            for v in self._versions.values()
            if v.state is state
            and (state is State.LOADING or not v.freed)  # a reader may not have allocated yet
            and v.mode is mode
            and v.layout == layout
            and v.world_size == world
            and v.content is not None
            and v.content.same_files(content)
            and (state is State.READY or not v.shares)  # a LOADING one reads, rather than waits
            and (not device_map or v.placed_on() == device_map)
        ]
        return min(candidates, key=lambda v: v.created, default=None)

    def _share_source(
        self, content: ContentId, mode: AllocationMode, device_map: list[int], world: int, layout: str
    ) -> ModelVersion | None:
        """The version a load of ``content`` would share (lock held): a READY one, else one still reading."""
        return self._sharable(content, mode, device_map, world, layout) or self._sharable(
            content, mode, device_map, world, layout, State.LOADING
        )

    def _share(
        self,
        ckpt: Checkpoint,
        name: str,
        version: str,
        alias: str | None,
        content: ContentId,
        mode: AllocationMode,
        device_map: list[int],
        layout: str,
        recipes: list[RankRecipe],
    ) -> LoadStart | None:
        """Registers ``name@version`` on the memory of a version read from the same files, when there is
        one: READY on a READY version's memory (nothing admitted, allocated or read: the bytes are resident
        already), or LOADING beside a version still reading them, to take its memory once it is READY
        (``_share_when_read``). None when no version qualifies."""
        key = f"{name}@{version}"
        world = ckpt.world_size
        with self._txn() as fx:
            found = self._share_source(content, mode, device_map, world, layout)
            if found is None:
                return None
            source, reading = (found, None) if found.state is State.READY else (None, found)
            self._check_names(name, alias)
            if key in self._versions:  # a concurrent load of the same key won the race: rejoin it
                old = self._existing(key, content, layout)
                if old is not None:
                    return self._rejoin(old, alias, fx)
            if reading is not None:
                mv = ModelVersion(
                    name=name,
                    version=version,
                    source=str(ckpt.path),
                    world_size=world,
                    mode=mode,
                    bytes_total=reading.bytes_total,
                    content=content,
                    shares=reading.key,
                    layout=layout,
                )
                self._versions[key] = mv
                fx.publish(EventKind.VERSION_ADDED, name, version=version, message=str(ckpt.path))
                fx.log("info", "load.waits", model=key, source=reading.key, path=str(ckpt.path))
                return LoadStart(
                    mv, partial(self._share_when_read, mv, reading, ckpt, alias, device_map, recipes), False
                )
            assert source is not None
            mv = self._sharer(name, version, str(ckpt.path), content, mode, source)
            self._versions[key] = mv
            self._changed.notify_all()
            fx.publish(EventKind.VERSION_ADDED, name, version=version, message=str(ckpt.path))
            fx.log("info", "load.shared", model=key, source=source.key, path=str(ckpt.path), bytes=mv.bytes_total)
            fx.publish(EventKind.VERSION_READY, name, version=version, message=mv.load_path)

        def run() -> ModelVersion:
            if alias:
                self.set_alias(alias, mv.key, create=True)
            return mv

        return LoadStart(mv, run, False)

    @staticmethod
    def _sharer(
        name: str,
        version: str,
        path: str,
        content: ContentId | None,
        mode: AllocationMode,
        source: ModelVersion,
    ) -> ModelVersion:
        """A READY version on ``source``'s memory: its own ranks, the same allocations."""
        note = f"shares the memory of {source.key} (same files): nothing read"
        return ModelVersion(
            name=name,
            version=version,
            source=path,
            world_size=source.world_size,
            mode=mode,
            state=State.READY,
            bytes_total=source.bytes_total,
            bytes_done=source.bytes_total,
            content=content,
            load_path=note,
            shares=source.key,
            layout=source.layout,
            ranks=[ResidentRank(r.rank, r.device, r.layout, list(r.allocations), load_path=note) for r in source.ranks],
        )

    def _share_when_read(
        self,
        mv: ModelVersion,
        reading: ModelVersion,
        ckpt: Checkpoint,
        alias: str | None,
        device_map: list[int],
        recipes: list[RankRecipe],
    ) -> ModelVersion:
        """``run`` of a version registered beside ``reading`` (the same files): waits until that load has
        settled, then takes a READY version's memory, or waits on another version reading the files, or,
        with neither, reads them itself (so of several waiters whose reader went away, one reads)."""
        assert mv.content is not None
        while True:
            with self._lock:
                while not reading.settled.is_set() and not mv.cancel.is_set():
                    self._changed.wait(0.5)
            source = nxt = None
            with self._txn() as fx:
                gone = mv.cancel.is_set() or self._versions.get(mv.key) is not mv
                if gone:  # unloaded while it waited: it ends as any cancelled load does
                    self._fail(mv, Unavailable(f"{mv.key} was unloaded while loading"), fx)
                else:
                    source = self._sharable(mv.content, mv.mode, device_map, mv.world_size, mv.layout)
                    if source is None:
                        nxt = self._sharable(mv.content, mv.mode, device_map, mv.world_size, mv.layout, State.LOADING)
                if source is not None:
                    done = self._sharer(mv.name, mv.version, mv.source, mv.content, mv.mode, source)
                    mv.ranks, mv.load_path, mv.shares = done.ranks, done.load_path, done.shares
                    mv.bytes_total = mv.bytes_done = done.bytes_total
                    mv.state = State.READY
                    self._changed.notify_all()
                    fx.log("info", "load.shared", model=mv.key, source=source.key, path=mv.source, bytes=mv.bytes_total)
                    fx.publish(EventKind.VERSION_READY, mv.name, version=mv.version, message=mv.load_path)
                elif nxt is not None:
                    mv.shares = nxt.key
                    fx.log("info", "load.waits", model=mv.key, source=nxt.key, path=mv.source)
                elif not gone:
                    mv.shares = ""  # from here on it reads: later loads of the same files wait on it
                    fx.log("info", "load.reads_itself", model=mv.key, source=reading.key)
            if gone:
                self._settle(mv)
                raise Unavailable(f"{mv.key} was unloaded while loading")
            if source is not None:
                try:
                    if alias:
                        self.set_alias(alias, mv.key, create=True)
                finally:
                    self._settle(mv)
                return mv
            if nxt is None:
                break
            reading = nxt
        try:
            layouts, devices = self._plan(ckpt, device_map, recipes)
            mv.bytes_total = sum(lay.nbytes for lay in layouts)
            mv.devices = devices
            self._admit_and_allocate(mv, layouts, devices)
        except BaseException as exc:
            with self._txn() as fx:
                self._fail(mv, exc, fx)
            self._settle(mv)
            raise
        return self._fill(mv, alias)

    def _settle(self, mv: ModelVersion) -> None:
        """Marks ``mv``'s load as over, its effects carried out, and wakes the loads waiting on it."""
        mv.settled.set()
        with self._lock:
            self._changed.notify_all()

    def _existing(self, key: str, content: ContentId, layout: str) -> ModelVersion | None:
        """The registered version ``key`` when it holds ``content`` in ``layout`` (lock held); None when
        there is none (a FAILED one is dropped); raises when it holds other content or is going away."""
        old = self._versions.get(key)
        if old is None:
            return None
        if old.state is State.FAILED:
            del self._versions[key]
            return None
        # A version kept resident for a rollback is retired but still served: the same content rejoins it.
        kept = bool(old.previous_of) and old.state is State.READY
        if old.state not in (State.LOADING, State.READY) or (old.retire and not kept):
            what = "retiring (its alias moved away)" if old.state is State.READY else old.state.value
            raise AlreadyExists(
                f"{key} is already loaded and {what}; load it again once it is freed, or use another version",
                ref=key,
                state=old.state.value,
            )
        if old.content is None:
            differences = ["the loaded version has no record of its files (restored from an older state file)"]
        else:
            differences = old.content.differences(content)
        if old.layout != layout:
            differences.append(f"it was loaded in layout {old.layout or 'none'}, this load asks for {layout or 'none'}")
        if differences:
            only_layout = len(differences) == 1 and old.layout != layout
            what = "in another layout" if only_layout else "with different content"
            raise ContentMismatch(
                f"{key} is already loaded ({old.state.value}) from {old.source} {what}: "
                f"{'; '.join(differences)}; unload it first or load under another version",
                ref=key,
                source=old.source,
                differences=differences,
            )
        return old

    def _rejoin(self, mv: ModelVersion, alias: str | None, fx: _Effects | None = None) -> LoadStart:
        """``fx``: the caller holds the registry lock (``_share``), so the log line waits for its release:
        a stalled log sink must not stall every registry call."""
        with self._lock:
            if not (mv.retire and mv.previous_of):  # a rollback's spare taken back is the taker's (is_spare)
                mv.joined = True
        fields = {"model": mv.key, "state": mv.state.value, "note": "already loaded, same content"}
        if fx is not None:
            fx.log("info", "load.already_loaded", **fields)
        else:
            log.info("load.already_loaded", **fields)

        def run() -> ModelVersion:
            with self._lock:
                while mv.state is State.LOADING:
                    self._changed.wait(0.5)
                if mv.state is not State.READY:
                    hint = f": {mv.error}" if mv.error else ""
                    raise FailedPrecondition(
                        f"{mv.key} is {mv.state.value}, not READY{hint}", ref=mv.key, state=mv.state.value
                    )
                move = alias if alias and self._aliases.get(alias) != mv.key else None
            with self._txn() as fx:
                if self.is_spare(mv) and mv.state is State.READY:
                    # Loaded again on purpose: no longer only a rollback's spare, so its hold ends
                    # without freeing it (and the state file hears of it through the event).
                    mv.retire = False
                    self._unhold(mv)
                    fx.publish(EventKind.VERSION_READY, mv.name, version=mv.version)
                    fx.log("info", "previous.loaded_again", model=mv.key)
            if move:  # as a normal load would; nothing to do when it points here already
                self.set_alias(move, mv.key, create=True)
            return mv

        return LoadStart(mv, run, True)

    def verify(self, ckpt: Checkpoint, verify: str | None) -> None:
        """Checks ``ckpt`` against its hotweights.json at the requested level (default: the daemon's)."""
        level = verify or "default"
        if level not in VERIFY_LEVELS:
            raise InvalidArgument(f"verify must be one of none, fast, full (got {shorten(verify)!r})")
        if level == "default":
            level = self.default_verify
        if level == "none":
            return
        if ckpt.manifest_path is None:
            if level == "full":
                # the daemon-wide level reaches plain HF directories too: say both ways forward
                source = 'the daemon\'s verify = "full"' if verify in (None, "default") else "this load's verify"
                raise FailedPrecondition(
                    f"{ckpt.path}: verify=full (from {source}) needs a hotweights.json manifest; none found. "
                    "Load it with --verify fast or none (nothing to check it against), or shard it with "
                    "`hotweights shard SRC OUT --tp 1` to write a manifest",
                    path=str(ckpt.path),
                )
            return
        from hotweights.format import manifest

        opened = {f.path.name: f.source for r in ckpt.ranks for f in r.files if f.source is not None}
        allow = self.roots.check if self.roots.confined else None
        manifest.verify_checkpoint(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent, level, opened, allow)

    def _place(self, world: int, device_map: list[int]) -> list[int]:
        devices = self.backend.devices()
        count = len(devices)
        if device_map:
            if len(device_map) != world:
                raise InvalidArgument(f"device map has {len(device_map)} entries for {world} ranks")
            bad = [d for d in device_map if not 0 <= d < count]
            if bad:
                raise InvalidArgument(f"device map names device(s) {bad}; this node has {count}")
            return device_map
        if self.backend.shared_device:
            return [0] * world
        if world > count:
            raise InsufficientMemory(
                f"checkpoint has {world} ranks but the node has {count} device(s); pass a device map",
                needed_devices=world,
                devices=count,
            )
        return list(range(world))

    def _admit(self, mv: ModelVersion, layouts: list[RankLayout], devices: list[int]) -> None:
        need: dict[int, int] = {}
        for lay, dev in zip(layouts, devices):
            need[dev] = need.get(dev, 0) + lay.reserved_bytes
        free = {d.index: d.free for d in self.backend.devices()}
        for dev, n in sorted(need.items()):
            if n > free.get(dev, 0):
                where = "host memory" if self.backend.shared_device else f"device {dev}"
                raise InsufficientMemory(
                    f"{mv.key} does not fit on {where}: needs {n} bytes ({_gib(n)}), {free.get(dev, 0)} free "
                    f"({_gib(free.get(dev, 0))}) after the reserve",
                    needed=n,
                    free=free.get(dev, 0),
                    device=dev,
                )

    def _allocate(self, mv: ModelVersion, layouts: list[RankLayout], devices: list[int]) -> None:
        """Allocates every rank; on failure what was allocated stays on ``mv`` for ``_fail`` to free."""
        for lay, dev in zip(layouts, devices):
            resident = ResidentRank(lay.rank, dev, lay, [])
            mv.ranks.append(resident)
            for size in lay.allocation_sizes:
                faults.hit("load.allocate", f"{mv.key} rank {lay.rank}")
                resident.allocations.append(self.backend.allocate(dev, size, mv.mode))

    def _fill(self, mv: ModelVersion, alias: str | None) -> ModelVersion:
        try:
            return self._read(mv, alias)
        finally:
            self._settle(mv)

    def _read(self, mv: ModelVersion, alias: str | None) -> ModelVersion:
        t0 = time.perf_counter()
        lock = threading.Lock()

        def progress(n: int) -> None:
            with lock:
                mv.bytes_done += n

        try:
            with (
                self.backend.concurrent_fills([r.device for r in mv.ranks]),
                ThreadPoolExecutor(max_workers=max(1, len(mv.ranks)), thread_name_prefix="hw-rank") as pool,
            ):
                futures = [pool.submit(self._fill_rank, r, progress, mv.cancel) for r in mv.ranks]
                paths, failures = [], []
                for f in futures:
                    try:
                        paths.append(f.result())
                    except BaseException as exc:
                        mv.cancel.set()  # the other ranks stop (Aborted)
                        failures.append(exc)
                if failures:  # the cause, not a rank it stopped
                    raise next((e for e in failures if not isinstance(e, Aborted)), failures[0])
            faults.hit("load.verify", mv.key)
        except BaseException as exc:
            with self._txn() as fx:
                self._fail(mv, exc, fx)
            raise
        mv.load_seconds = time.perf_counter() - t0
        mv.load_path = "; ".join(sorted(set(paths)))
        with self._txn() as fx:
            if mv.cancel.is_set():
                self._fail(mv, Unavailable(f"{mv.key} was unloaded while loading"), fx)
                raise Unavailable(f"{mv.key} was unloaded while loading")
            mv.state = State.READY
            self._changed.notify_all()
            rate = mv.bytes_total / mv.load_seconds / 1e9 if mv.load_seconds else 0.0
            fx.log(
                "info",
                "load.ready",
                model=mv.key,
                seconds=round(mv.load_seconds, 3),
                gbps=round(rate, 2),
                path=mv.load_path,
            )
            fx.publish(EventKind.VERSION_READY, mv.name, version=mv.version, message=mv.load_path)
        if alias:
            self.set_alias(alias, mv.key, create=True)
        return mv

    def _fill_rank(self, r: ResidentRank, progress: Callable[[int], None], cancel: threading.Event) -> str:
        t0 = time.perf_counter()
        path = self.backend.fill(r.layout, r.allocations, progress, cancel)
        r.load_seconds = time.perf_counter() - t0
        r.load_path = path
        return path

    def _fail(self, mv: ModelVersion, exc: BaseException, fx: _Effects, publish: bool = True) -> None:
        """Marks ``mv`` FAILED and queues its memory to be freed (lock held)."""
        self._free_memory(mv, fx)
        mv.state = State.FAILED
        mv.error = str(exc) if isinstance(exc, HotweightsError) else f"{type(exc).__name__}: {exc}"
        self._changed.notify_all()
        fx.log("warning", "load.failed", model=mv.key, error=mv.error)
        if publish:
            fx.publish(
                EventKind.VERSION_FAILED, mv.name, version=mv.version, message=mv.error, reason=type(exc).__name__
            )

    # ---- unloading and freeing ------------------------------------------------------------

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

    def _drop(self, mv: ModelVersion, fx: _Effects) -> None:
        """Removes a version from the registry and queues its memory to be freed (lock held)."""
        self._stop_or_free(mv, fx)
        mv.state = State.UNLOADING
        self._versions.pop(mv.key, None)
        self._changed.notify_all()
        fx.log("info", "version.freed", model=mv.key)
        fx.publish(EventKind.VERSION_FREED, mv.name, version=mv.version)

    def _stop_or_free(self, mv: ModelVersion, fx: _Effects) -> None:
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

    def _free_memory(self, mv: ModelVersion, fx: _Effects) -> None:
        """Takes ``mv``'s memory out of the registry at once (nothing serves it any more) and queues
        to free what no other registered version shares (lock held); the last holder frees it."""
        if mv.ranks:
            fx.free([a for _, a in self._own(mv)])
        mv.ranks = []

    def _maybe_retire(self, mv: ModelVersion, fx: _Effects) -> None:
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

    # ---- leases and handles ---------------------------------------------------------------

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

    # ---- aliases and swaps ----------------------------------------------------------------

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
        self, alias: str, key: str, expect: str, *, create: bool = False, loaded_here: bool = True
    ) -> None:
        """A drain swap's last step: points ``alias`` at ``key`` only if it still names ``expect`` (the
        version it drained), checked and moved in one step. Where it was moved or removed while the swap
        loaded, it is left so (that move was answered as done), ``key`` is retired when the swap loaded
        it (``loaded_here``; freed when its last lease ends, unless something names it; a version that
        was resident already, or that another load joined, is someone else's) and FailedPrecondition says
        what happened."""
        with self._txn() as fx:
            now = self._aliases.get(alias)
            if now != expect:
                mv = self._versions.get(key)
                retired = loaded_here and mv is not None and not mv.joined and not self.aliases_of(key)
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

    def drain_swap_failure(self, alias: str) -> DrainSwapFailure | None:
        """Why ``alias`` names nothing, if a failed drain swap left it so and nothing has moved it since."""
        with self._lock:
            failed = self._swap_failed.get(alias)
            if failed is None or self._aliases.get(alias) != failed.old_key or failed.old_key in self._versions:
                return None
            return failed

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
                    f"{_gib(free.get(dev, 0))} free on {where}, below the {_gib(n)} of {mv.key} "
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

    # ---- lifetime -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the daemon is shutting down")

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


def bytes_by_device(held: Iterable[tuple[ModelVersion, ResidentRank, Allocation]]) -> dict[int, int]:
    """The sizes of ``held`` (``unique_allocations()``) summed per device."""
    out: dict[int, int] = {}
    for _, r, a in held:
        out[r.device] = out.get(r.device, 0) + a.size
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _no_constant(name: str) -> Any:
    """JSON's NaN and Infinity are no sizes or counts: a config holding one is refused."""
    raise ValueError(f"{name} is not a number a config may hold")
