"""The gRPC servicer: protobuf in, a core call, protobuf out. Errors map in hotweights.wire.status.

The event loop only translates: every core call that can block (a load, a free, a drain, a device
query) runs in the servicer's worker threads, so one slow GPU free never delays another client.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import structlog

from hotweights import errors
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import SUBSCRIBED_KEY, abort_with
from hotweightsd import __version__
from hotweightsd.core import leases
from hotweightsd.core.events import Event, EventKind
from hotweightsd.core.manager import ModelManager, bytes_by_device
from hotweightsd.core.registry import ModelVersion, check_name
from hotweightsd.server import convert
from hotweightsd.server.metrics import DaemonMetrics
from hotweightsd.server.tables import TableCache
from hotweightsd.server.watchers import QUEUE_DEPTH, EventHub, Overflow

log = structlog.get_logger("hotweightsd.service")
PROGRESS_INTERVAL = 0.2
# Short blocking core calls (unload, lease opens and ends, aliases) at once; loads run in their own pool.
CALL_THREADS = 32
LOAD_THREADS = 64
# A drain swap waits for other clients' leases to end, for as long as its drain timeout: on the call
# pool, enough of them would leave no thread for the very lease ends they wait for, nor for any other
# client's call. They get threads of their own, one each (a waiting drain holds its thread; none queues
# behind another's timeout), and one more than there are is refused rather than queued.
DRAIN_THREADS = 64
T = TypeVar("T")


class _Grant(NamedTuple):
    lease: leases.Lease
    granted: pb.LeaseGranted
    moved: pb.AliasMoved | None  # reported right after the grant
    seen: int  # events up to this sequence number are reflected in the grant
    told: tuple[str, str]  # (name, version) the holder learns the followed alias names


def rpc(fn: Callable) -> Callable:
    """Turns hotweights errors (and bugs) raised by a unary handler into statuses."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except errors.HotweightsError as exc:
            await abort_with(context, exc)
        except Exception as exc:
            log.exception("rpc.internal_error", method=fn.__name__)
            await abort_with(context, errors.Internal(f"internal error in {fn.__name__}: {type(exc).__name__}: {exc}"))

    return wrapper


# One message per event, whichever number of watchers send it.
_watch_event = functools.lru_cache(maxsize=256)(convert.watch_event)


def stream_rpc(fn: Callable) -> Callable:
    """The same for server-streaming handlers (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            async for item in fn(self, request, context):
                yield item
        except errors.HotweightsError as exc:
            await abort_with(context, exc)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            log.exception("rpc.internal_error", method=fn.__name__)
            await abort_with(context, errors.Internal(f"internal error in {fn.__name__}: {type(exc).__name__}: {exc}"))

    return wrapper


class HotweightsService(pb_grpc.HotweightsServicer):
    def __init__(
        self,
        manager: ModelManager,
        socket_path: str,
        fd_socket: str,
        restored: bool = False,
        restore_note: str = "",
        metrics: DaemonMetrics | None = None,
        watch_queue: int = QUEUE_DEPTH,
    ) -> None:
        self.m = manager
        self.watch_queue = watch_queue
        self.metrics = metrics
        self.socket_path = socket_path
        self.fd_socket = fd_socket
        self.restored = restored
        self.restore_note = restore_note
        # Filled in by the loads at start, which run after the sockets answer.
        self.start_failures: list[str] = []
        self._background: set[asyncio.Future] = set()
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="hw-call")
        self._loads = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="hw-load")
        self._drains = ThreadPoolExecutor(DRAIN_THREADS, thread_name_prefix="hw-drain")
        self._draining = 0  # drain swaps being planned (counted on the event loop)
        self.tables = TableCache()
        self._unsubscribe = manager.events.subscribe(self.tables.forget)
        self._hub: EventHub | None = None

    def close(self) -> None:
        """Stops taking work; calls already running finish in their threads."""
        self._unsubscribe()
        if self._hub is not None:
            self._hub.close()
        self._calls.shutdown(wait=False, cancel_futures=False)
        self._loads.shutdown(wait=False, cancel_futures=False)
        self._drains.shutdown(wait=False, cancel_futures=False)

    def _blocking(self, fn: Callable[..., T], *args: Any, **kw: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._calls, functools.partial(fn, *args, **kw))

    def hub(self) -> EventHub:
        """The streams' event fan-out, made on the event loop by the first stream that needs it."""
        if self._hub is None:
            self._hub = EventHub(self.m.events, self.m.aliases, self.watch_queue)
        return self._hub

    # ---- loading --------------------------------------------------------------------------

    @stream_rpc
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> AsyncIterator[pb.LoadEvent]:
        start = await self._registered(
            self._blocking(
                self.m.start_load,
                request.name,
                request.path,
                version=request.version or None,
                alias=request.alias or None,
                verify=convert.enum_arg(convert.VERIFY_OF, request.verify, "verify"),
                mode=convert.enum_arg(convert.MODE_OF, request.allocation, "allocation"),
                device_map=list(request.device_map),
                layout=request.layout,
            )
        )
        async for ev in self._run_load(start.version, start.run, request.wait, start.already_loaded):
            yield ev

    async def _registered(self, call: asyncio.Future[T], counted: bool = True) -> T:
        """``call``'s result: a load (or swap) registered and admitted, with its ``run`` still to do. A caller
        that goes away meanwhile does not stop it: once registered, its read runs in the background, or
        the version would stay LOADING with its memory admitted, and loads of the same files wait on it.
        ``counted``: a refusal is a load failure (not where nothing was to be read)."""
        try:
            return await (self._refusals_counted(asyncio.shield(call)) if counted else asyncio.shield(call))
        except asyncio.CancelledError:
            call.add_done_callback(self._run_orphan)
            raise

    def _run_orphan(self, call: asyncio.Future) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        task = asyncio.get_running_loop().run_in_executor(self._loads, call.result().run)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors are reported on the version

    async def _refusals_counted(self, call: asyncio.Future[T]) -> T:
        """``call``'s result; a load it refuses (before reading: no VERSION_FAILED event) is counted."""
        try:
            return await call
        except errors.HotweightsError as exc:
            if self.metrics is not None:
                self.metrics.refused(exc)
            raise

    async def _run_load(
        self, mv: ModelVersion, run: Callable, wait: bool, already_loaded: bool = False
    ) -> AsyncIterator[pb.LoadEvent]:
        # The load runs to completion even if this caller goes away: another client may be waiting on it.
        task = asyncio.get_running_loop().run_in_executor(self._loads, run)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors are reported on mv
        if not wait:
            yield pb.LoadEvent(done=await self._version_info(mv, already_loaded))
            return
        while not task.done():
            yield pb.LoadEvent(
                progress=pb.LoadProgress(bytes_done=mv.bytes_done, bytes_total=mv.bytes_total, phase="reading")
            )
            await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
        task.result()
        yield pb.LoadEvent(done=await self._version_info(mv, already_loaded))

    def _version_info(self, mv: ModelVersion, already_loaded: bool = False) -> asyncio.Future[pb.ModelVersionInfo]:
        # built in a worker thread: it asks the manager for the version's aliases and sharing, under the
        # registry lock, and a wait for that lock on the loop would stall every other call and stream
        return self._blocking(convert.version_info, mv, self.m, already_loaded)

    @rpc
    async def UnloadModel(self, request, context) -> pb.UnloadModelResponse:
        freed, total = await self._blocking(self.m.unload, request.ref, request.force)
        return pb.UnloadModelResponse(unloaded=freed, bytes_freed=total)

    @rpc
    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        # built in a worker thread: with a thousand versions it takes longer than the loop may stall
        return await self._blocking(self._list_models)

    def _list_models(self) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            versions=[convert.version_info(v, self.m) for v in self.m.versions()], aliases=convert.aliases(self.m)
        )

    @rpc
    async def Status(self, request, context) -> pb.StatusResponse:
        return await self._blocking(self._status)

    def _status(self) -> pb.StatusResponse:
        devices = self.m.backend.devices()
        versions = self.m.versions()
        # each allocation once: versions loaded from the same files share theirs
        unique = self.m.unique_allocations()
        resident = bytes_by_device(unique)
        return pb.StatusResponse(
            daemon_version=__version__,
            pid=os.getpid(),
            backend=self.m.backend.name,
            socket=self.socket_path,
            uptime_seconds=time.time() - self.m.started,
            devices=[
                pb.DeviceInfo(
                    index=d.index,
                    name=d.name,
                    total_bytes=d.total,
                    free_bytes=d.free,
                    resident_bytes=resident.get(d.index, 0),
                    reserve_bytes=self.m.backend.reserve,
                )
                for d in devices
            ],
            versions=[convert.version_info(v, self.m) for v in versions],
            leases=[convert.lease_info(le) for le in self.m.leases()],
            aliases=convert.aliases(self.m),
            resident_bytes=sum(resident.values()),
            open_allocations=len(unique),
            gds=self.m.backend.note,
            restored=self.restored,
            restore_note=self.restore_note,
            start_failures=list(self.start_failures),
        )

    # ---- leases and handles ---------------------------------------------------------------

    def _handles(self, lease_id: str, lease_key: str, rank: int, compact: bool) -> pb.GetHandlesResponse:
        h = self.m.get_handles(lease_id, rank, lease_key)
        table = self.tables.get(
            (h.version.key, h.rank.rank, compact),
            h.rank,
            lambda: convert.handles_template(h.version, h.rank, self.fd_socket, compact),
        )
        return convert.with_ticket(table, h.ticket, h.ttl)

    @rpc
    async def GetHandles(self, request, context) -> pb.GetHandlesResponse:
        return await self._blocking(
            self._handles, request.lease_id, request.lease_key, request.rank, request.compact_table
        )

    def _open_lease(self, req: pb.LeaseOpen) -> _Grant:
        """Opens a lease and builds its grant (with the rank's handles when asked) and, when the alias it
        follows names another version already, the move to report; a lease whose grant cannot be built
        is closed again."""
        lease = self.m.open_lease(req.ref, pid=req.pid, holder=req.holder)
        try:
            moved, seen, told = None, lease.seq, (lease.name, lease.version)
            if req.follow and req.follow != req.ref:
                now, seen = self.m.alias_target(req.follow)
                name, _, version = now.partition("@")
                if now and (name, version) != told:
                    moved = pb.AliasMoved(alias=req.follow, name=name, old_version=lease.version, new_version=version)
                    told = (name, version)
            granted = pb.LeaseGranted(
                lease_id=lease.id,
                name=lease.name,
                version=lease.version,
                world_size=self.m.get(lease.name, lease.version).world_size,
                lease_key=lease.key,
            )
            if req.with_handles:
                granted.handles.CopyFrom(self._handles(lease.id, lease.key, req.rank, req.compact_table))
        except BaseException:
            self.m.close_lease(lease.id)
            raise
        return _Grant(lease, granted, moved, seen, told)

    def _close_abandoned(self, opening: asyncio.Future) -> None:
        """Ends the lease ``opening`` opened for a stream that went away while it was being opened."""
        if opening.cancelled() or opening.exception() is not None:
            return
        lease_id = opening.result().lease.id
        try:
            closing = self._blocking(self.m.close_lease, lease_id)
        except RuntimeError:  # the pool has shut down: the daemon is stopping and ends every lease
            return
        closing.add_done_callback(
            lambda f: (
                f.cancelled()
                or f.exception() is None
                or log.error("lease.close_failed", lease=lease_id, error=str(f.exception()))
            )
        )

    @stream_rpc
    async def Lease(self, request_iterator, context) -> AsyncIterator[pb.LeaseEvent]:
        lease = None
        events = None
        try:
            try:
                first = await request_iterator.__anext__()
            except StopAsyncIteration:
                return  # the client went away before asking for anything
            if first.WhichOneof("msg") != "open":
                raise errors.InvalidArgument("a Lease stream must start with an open message")
            # Subscribed before the lease opens, so that a move while it opens is not lost; a move to
            # the version the lease got is no news to its holder and is skipped.
            follow = first.open.follow or first.open.ref
            if first.open.follow:
                check_name("alias to follow", first.open.follow)
            hub = self.hub()
            events = hub.subscribe(
                lambda ev, _: ev.kind is EventKind.ALIAS_MOVED and ev.alias == follow, overflow=Overflow.DROP_OLDEST
            )
            t0 = time.perf_counter()
            # In a worker thread (the registry lock and a first attach's table encoding stay off the
            # event loop); shielded, so that a stream cancelled meanwhile still ends the lease it got.
            opening = self._blocking(self._open_lease, first.open)
            try:
                grant = await asyncio.shield(opening)
            except asyncio.CancelledError:
                opening.add_done_callback(self._close_abandoned)
                raise
            except BaseException:
                if self.metrics is not None:
                    self.metrics.attaches.labels("error").inc()
                raise
            if self.metrics is not None:
                self.metrics.attaches.labels("ok").inc()
                self.metrics.attach_seconds.observe(time.perf_counter() - t0)
            lease = grant.lease
            yield pb.LeaseEvent(granted=grant.granted)
            if grant.moved is not None:  # moved while this holder was away (a daemon restart)
                yield pb.LeaseEvent(alias_moved=grant.moved)
            told = grant.told  # what the holder was last told the alias names
            reader = asyncio.ensure_future(self._until_release(request_iterator))
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({reader, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                    # a move the grant already reflects, or to what the holder was last told, is no news
                    elif (ev := getter.result()).seq > grant.seen and (ev.name, ev.version) != told:
                        told = (ev.name, ev.version)
                        yield pb.LeaseEvent(
                            alias_moved=pb.AliasMoved(
                                alias=ev.alias, name=ev.name, old_version=ev.old_version, new_version=ev.version
                            )
                        )
                    if reader in done:
                        break
            finally:
                reader.cancel()
        finally:
            if events is not None:
                hub.unsubscribe(events)
            if lease is not None:
                # The end of a lease may free a retired version: in a thread, and shielded so that the
                # stream's cancellation cannot drop the call before it ran.
                await asyncio.shield(self._blocking(self.m.close_lease, lease.id))

    @staticmethod
    async def _until_release(request_iterator) -> None:
        async for msg in request_iterator:
            if msg.WhichOneof("msg") == "release":
                return

    # ---- aliases, swaps, watch ------------------------------------------------------------

    @rpc
    async def SetAlias(self, request, context) -> pb.SetAliasResponse:
        if request.remove:
            if request.target:
                raise errors.InvalidArgument("remove takes no target: give either a target or remove")
            key = await self._blocking(self.m.remove_alias, request.alias)
        elif request.target:
            _, key = await self._blocking(self.m.set_alias, request.alias, request.target, create=request.create)
        else:
            raise errors.InvalidArgument("no target given: pass NAME@VERSION, or remove=true to delete the alias")
        name, _, version = key.partition("@")
        return pb.SetAliasResponse(alias=pb.AliasInfo(alias=request.alias, name=name, version=version))

    @rpc
    async def Rollback(self, request, context) -> pb.RollbackResponse:
        mv, old, note = await self._blocking(self.m.rollback, request.alias)
        info = await self._version_info(mv)
        info.previous_note = note
        return pb.RollbackResponse(
            alias=pb.AliasInfo(alias=request.alias, name=mv.name, version=mv.version),
            old_version=old.partition("@")[2],
            version=info,
        )

    @stream_rpc
    async def SwapModel(self, request: pb.SwapModelRequest, context) -> AsyncIterator[pb.LoadEvent]:
        from hotweightsd.core.swap import SwapMode, is_path, swap

        mode = SwapMode(convert.enum_arg(convert.SWAP_OF, request.mode, "mode"))
        drain_timeout = request.drain_timeout_seconds or 60.0
        if not math.isfinite(drain_timeout) or drain_timeout < 0:
            raise errors.InvalidArgument(
                f"drain_timeout_seconds must be a finite number of seconds >= 0, got {drain_timeout}"
            )
        verify = convert.enum_arg(convert.VERIFY_OF, request.verify, "verify")
        planning = self._drain_thread if mode is SwapMode.DRAIN else self._blocking
        resident = not is_path(request.target)
        # A swap to a loaded NAME@VERSION reads nothing: a typo in it is not a failed load, and would
        # otherwise page whoever alerts on load failures.
        plan = await self._registered(
            planning(
                swap,
                self.m,
                request.alias,
                request.target,
                version=request.version or None,
                mode=mode,
                drain_timeout=drain_timeout,
                verify=verify,
                name=request.name or None,
                create=request.create,
                keep_previous=convert.enum_arg(convert.KEEP_OF, request.keep_previous, "keep_previous"),
                layout=request.layout,
            ),
            counted=not resident,
        )
        # A NAME@VERSION target is resident already (else the plan refused it), and so may be a path's
        # version: then its run reads nothing, only moves the alias, and the answer says so.
        async for ev in self._run_load(plan.version, plan.run, wait=True, already_loaded=plan.already_loaded):
            if ev.WhichOneof("event") == "done":
                ev.done.previous_note = plan.note
                if self.metrics is not None:
                    # counted before the last event goes out: the caller may close the stream on it
                    self.metrics.swaps.labels(mode.value).inc()
            yield ev

    def _drain_thread(self, fn: Callable[..., T], *args: Any, **kw: Any) -> asyncio.Future[T]:
        """``fn`` in a drain thread of its own, or ResourceExhausted when every one is waiting already."""
        if self._draining >= DRAIN_THREADS:
            raise errors.ResourceExhausted(
                f"{self._draining} drain swaps are already waiting for leases to end (at most {DRAIN_THREADS}); "
                f"retry once one has finished",
                draining=self._draining,
            )
        call = asyncio.get_running_loop().run_in_executor(self._drains, functools.partial(fn, *args, **kw))
        self._draining += 1
        call.add_done_callback(self._drain_ended)
        return call

    def _drain_ended(self, call: asyncio.Future) -> None:
        self._draining -= 1

    @stream_rpc
    async def Watch(self, request, context) -> AsyncIterator[pb.WatchEvent]:
        ref = request.ref

        def keep(ev: Event, aliases: Mapping[str, str]) -> bool:
            # An alias watcher follows the alias and every version of the model it points at.
            if not ref or ev.alias == ref:
                return True
            return ev.name == (aliases.get(ref) or ref).partition("@")[0]

        hub = self.hub()
        events = hub.subscribe(keep, needs_aliases=bool(ref))
        try:
            # the watcher may know it is subscribed: no event is missed
            await context.send_initial_metadata(((SUBSCRIBED_KEY, "1"),))
            while True:
                yield _watch_event(await events.get())
        finally:
            hub.unsubscribe(events)


# No request is larger than a few paths and names: a bigger one is refused by gRPC (RESOURCE_EXHAUSTED)
# before Python sees it. Answers (tensor tables) may be large.
MAX_REQUEST_BYTES = 1 * 2**20


# Calls that have arrived and that grpc.aio's server loop has not yet taken from gRPC core. Core's
# defaults (1,000, then calls dropped at random, all of them from 3,000) end new calls with CANCELLED
# when a burst of Watch streams opens faster than the loop takes them: a client that opens thousands
# of watchers at once would lose a share of them (their status would come back as a trailers-only
# answer, which ends ``initial_metadata()`` as headers would). Soft and hard limit equal: no random
# drops below it.
MAX_PENDING_CALLS = 20_000


def grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]
