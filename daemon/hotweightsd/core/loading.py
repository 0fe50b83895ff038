"""Loading a checkpoint into a new version: refused up front where it cannot be (names, layout,
verification, memory), shared with a version read from the very same files, or read rank by rank
into memory the backend allocates. Part of ``ModelManager`` (manager.py)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from hotweights.errors import (
    Aborted,
    AlreadyExists,
    ContentMismatch,
    FailedPrecondition,
    HotweightsError,
    InsufficientMemory,
    InvalidArgument,
    NotFound,
    Unavailable,
    shorten,
)
from hotweights.format.checkpoint import Checkpoint, open_checkpoint
from hotweights.format.engine_layout import RankRecipe, check_layout, rank_recipe
from hotweights.format.source import read_small
from hotweightsd.core import faults
from hotweightsd.core.backend import AllocationMode
from hotweightsd.core.content import ContentId, content_of
from hotweightsd.core.events import EventKind
from hotweightsd.core.layout import RankLayout, plan_rank
from hotweightsd.core.registry import ModelVersion, ResidentRank, State, check_name
from hotweightsd.core.state import Effects, ManagerState, gib

log = structlog.get_logger("hotweightsd.manager")

VERIFY_LEVELS = ("default", "none", "fast", "full")


class LoadStart(NamedTuple):
    version: ModelVersion
    run: Callable[[], ModelVersion]
    # True when ``version`` was already loaded (or loading) from the same content: ``run`` reads nothing.
    already_loaded: bool


class LoadingMixin(ManagerState):
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
        recipes = self.layout_recipes(ckpt, layout)  # before verify: a checkpoint the layout refuses is not hashed
        content = content_of(ckpt, recipe_digest(recipes) if layout else "")
        with self._lock:
            old = self._existing(f"{name}@{version}", content, layout)
        if old is not None:
            return self._rejoin(old, alias)
        # Verified like any load, also when it will share: what a load refuses must not depend on what
        # else is resident (an explicit verify=full is not skipped because another name loaded the
        # same files with verify=none). Only tensor data is never read again.
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

    def _rejoin(self, mv: ModelVersion, alias: str | None, fx: Effects | None = None) -> LoadStart:
        """``fx``: the caller holds the registry lock (``_share``), so the log line waits for its release:
        a stalled log sink must not stall every registry call."""
        with self._lock:
            mv.joins += 1
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
                    f"{mv.key} does not fit on {where}: needs {n} bytes ({gib(n)}), {free.get(dev, 0)} free "
                    f"({gib(free.get(dev, 0))}) after the reserve",
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

    def _fail(self, mv: ModelVersion, exc: BaseException, fx: Effects, publish: bool = True) -> None:
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


def recipe_digest(recipes: list[RankRecipe]) -> str:
    """A stable digest of what a layout does to each rank (frozensets sorted: their order is per process)."""
    doc = [[[[f.name, list(f.parts), f.pad_rows, list(f.shape)] for f in r.fused], sorted(r.dropped)] for r in recipes]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def _no_constant(name: str) -> Any:
    """JSON's NaN and Infinity are no sizes or counts: a config holding one is refused."""
    raise ValueError(f"{name} is not a number a config may hold")
