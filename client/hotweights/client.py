"""The client library: what serving processes and operators import."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from hotweights import errors

# Socket resolution and the diagnosis of an unreachable daemon live in hotweights.reach; their public
# names stay importable from here too, where they were first.
from hotweights.reach import (
    DEFAULT_ORIGIN,  # noqa: F401
    diagnose_unreachable,
    operator_unreachable,
    resolve_operator_socket,
    resolve_socket,
)
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import SUBSCRIBED_KEY, error_from_rpc

if TYPE_CHECKING:  # torch is imported only by processes that attach
    from hotweights.attach import Attachment

_VERIFY = {None: pb.VERIFY_DEFAULT, "none": pb.VERIFY_NONE, "fast": pb.VERIFY_FAST, "full": pb.VERIFY_FULL}
_ALLOC = {"fd": pb.ALLOCATION_FD, "legacy_ipc": pb.ALLOCATION_LEGACY_IPC, None: pb.ALLOCATION_MODE_DEFAULT}
_SWAP = {"side-by-side": pb.SWAP_SIDE_BY_SIDE, "drain": pb.SWAP_DRAIN, None: pb.SWAP_MODE_DEFAULT}
_KEEP = {None: pb.KEEP_PREVIOUS_DEFAULT, True: pb.KEEP_PREVIOUS_YES, False: pb.KEEP_PREVIOUS_NO}

ProgressFn = Callable[[int, int], None]

log = logging.getLogger("hotweights.client")


def _choice(table: dict, value, what: str):
    try:
        return table[value]
    except KeyError:
        raise errors.InvalidArgument(f"{what} must be one of {[k for k in table if k]}, got {value!r}") from None


class Client:
    """A connection to the node's hotweights daemon over its unix socket.

    ``origin`` says where ``socket`` came from (a flag name, for messages); without a socket, the
    path and its origin come from ``HOTWEIGHTS_SOCKET`` or the default rules.
    """

    def __init__(
        self,
        socket: str | None = None,
        timeout: float = 10.0,
        origin: str | None = None,
        operator_socket: str | None = None,
    ) -> None:
        self.socket, self.origin = resolve_socket(socket, origin)
        # Operator calls (load, unload, swap, alias) go to the operator socket, opened at the first one.
        self.operator_socket, self.operator_origin = resolve_operator_socket(self.socket, operator_socket)
        self.timeout = timeout
        self.channel = _channel(self.socket)
        self.stub = pb_grpc.HotweightsStub(self.channel)
        self._operator_channel: grpc.Channel | None = None
        self._operator_stub: pb_grpc.HotweightsStub | None = None
        self._operator_lock = threading.Lock()
        self._closed = False
        # The attachments made through this client that may still hold a lease; close() releases them.
        # Keyed by a counter: an Attachment is a Mapping, so it cannot be hashed itself.
        self._attachments: weakref.WeakValueDictionary[int, Attachment] = weakref.WeakValueDictionary()
        self._attachment_ids = itertools.count()

    @property
    def operator_stub(self) -> pb_grpc.HotweightsStub:
        with self._operator_lock:
            if self._operator_stub is None:
                self._operator_channel = _channel(self.operator_socket)
                self._operator_stub = pb_grpc.HotweightsStub(self._operator_channel)
            return self._operator_stub

    def _error(self, exc: grpc.RpcError, what: str = "the call") -> errors.HotweightsError:
        return self._explained(error_from_rpc(exc), what)

    def _explained(self, err: errors.HotweightsError, what: str = "the call") -> errors.HotweightsError:
        """A transport failure turned into which of: not running / wrong path / permission; a
        cancelled call (``what``) into one that names the daemon's socket."""
        if isinstance(err, errors.Unavailable) and err.details.get("transport"):
            if err.details.get("cancelled"):
                return self._cancelled(err, self.socket, what)
            return diagnose_unreachable(self.socket, self.origin, str(err.details.get("grpc_message", "")))
        return err

    def _cancelled(self, err: errors.Unavailable, socket: str, what: str) -> errors.HotweightsError:
        """A cancelled call: cut short by this client's own close, or cancelled by the daemon on ``socket``."""
        return _closed_here(err, what) if self._closed else _cancelled_by_daemon(err, socket, what)

    def _operator_error(self, exc: grpc.RpcError, rpc: str) -> errors.HotweightsError:
        """The same for a call on the operator socket: a socket this user may not open means the call
        needs an operator (``OperatorRequired``)."""
        err = error_from_rpc(exc)
        if not (isinstance(err, errors.Unavailable) and err.details.get("transport")):
            return err
        if err.details.get("cancelled"):
            return self._cancelled(err, self.operator_socket, rpc)
        return operator_unreachable(
            rpc,
            self.operator_socket,
            self.operator_origin,
            diagnose_unreachable(self.operator_socket, self.operator_origin, str(err.details.get("grpc_message", ""))),
            readers_socket=self.socket,
        )

    def _call(self, method, request, timeout: float | None = -1):
        try:
            return method(request, timeout=self.timeout if timeout == -1 else timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _operator_call(self, rpc: str, request, timeout: float | None = -1):
        try:
            return getattr(self.operator_stub, rpc)(request, timeout=self.timeout if timeout == -1 else timeout)
        except grpc.RpcError as exc:
            raise self._operator_error(exc, rpc) from None

    def wait_ready(self, timeout: float = 10.0) -> Client:
        """Blocks until the daemon answers, or raises Unavailable."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise diagnose_unreachable(self.socket, self.origin, f"no answer within {timeout:g} s") from None
        return self

    # ---- operator calls -------------------------------------------------------------------

    def load(
        self,
        name: str,
        path: str | os.PathLike,
        version: str | None = None,
        alias: str | None = None,
        verify: str | None = None,
        allocation: str | None = None,
        device_map: Sequence[int] = (),
        wait: bool = True,
        progress: ProgressFn | None = None,
        layout: str = "",
    ) -> pb.ModelVersionInfo:
        """Loads a checkpoint as ``name@version``; returns the version's info once READY (or registered).

        ``layout``: "" serves the tensors as the files hold them; "vllm" serves them in vLLM's parameter
        layout (q|k|v and gate|up fused, the vocabulary padded to a multiple of 64), which the vLLM
        plugin binds without a copy.
        """
        req = pb.LoadModelRequest(
            name=name,
            path=os.path.abspath(os.fspath(path)),
            version=version or "",
            alias=alias or "",
            verify=_choice(_VERIFY, verify, "verify"),
            allocation=_choice(_ALLOC, allocation, "allocation"),
            device_map=list(device_map),
            wait=wait,
            layout=layout,
        )
        return _layout_applied(self._stream_load("LoadModel", req, progress), layout)

    def swap(
        self,
        alias: str,
        target: str,
        version: str | None = None,
        mode: str | None = None,
        drain_timeout: float = 60.0,
        verify: str | None = None,
        name: str | None = None,
        progress: ProgressFn | None = None,
        create: bool = False,
        keep_previous: bool | None = None,
        layout: str = "",
    ) -> pb.ModelVersionInfo:
        """Points ``alias`` at ``NAME@VERSION``, or at a new version loaded from a path.

        The alias must exist unless ``create``. ``keep_previous`` keeps the version it moves away
        from resident for a ``rollback`` (None: the daemon's setting, when memory allows);
        ``previous_note`` of the answer says what became of it. ``layout``: as ``load``'s, for a path
        target; "" keeps the layout of the version the alias names, "none" asks for the files' own.
        """
        if os.path.exists(target) or "/" in target:
            target = os.path.abspath(target)
        req = pb.SwapModelRequest(
            alias=alias,
            target=target,
            version=version or "",
            mode=_choice(_SWAP, mode, "mode"),
            drain_timeout_seconds=drain_timeout,
            verify=_choice(_VERIFY, verify, "verify"),
            name=name or "",
            create=create,
            keep_previous=_KEEP[keep_previous],
            layout=layout,
        )
        return _layout_applied(self._stream_load("SwapModel", req, progress), layout)

    def _stream_load(self, rpc: str, req, progress: ProgressFn | None) -> pb.ModelVersionInfo:
        try:
            for ev in getattr(self.operator_stub, rpc)(req):
                if ev.WhichOneof("event") == "progress":
                    if progress is not None:
                        progress(ev.progress.bytes_done, ev.progress.bytes_total)
                else:
                    return ev.done
        except grpc.RpcError as exc:
            raise self._operator_error(exc, rpc) from None
        raise errors.Internal("the daemon ended the load stream without a result")

    def unload(self, ref: str, force: bool = False) -> pb.UnloadModelResponse:
        return self._operator_call("UnloadModel", pb.UnloadModelRequest(ref=ref, force=force), timeout=None)

    def set_alias(self, alias: str, target: str, create: bool = False) -> pb.AliasInfo:
        """Points an existing alias (a new one with ``create``) at ``NAME@VERSION``."""
        return self._operator_call("SetAlias", pb.SetAliasRequest(alias=alias, target=target, create=create)).alias

    def remove_alias(self, alias: str) -> pb.AliasInfo:
        return self._operator_call("SetAlias", pb.SetAliasRequest(alias=alias, remove=True)).alias

    def rollback(self, alias: str) -> pb.RollbackResponse:
        """Points ``alias`` back at the version a swap kept resident; reads nothing."""
        return self._operator_call("Rollback", pb.RollbackRequest(alias=alias))

    def list(self) -> pb.ListModelsResponse:
        return self._call(self.stub.ListModels, pb.ListModelsRequest())

    def listed_version(
        self, name: str, version: str, listing: pb.ListModelsResponse | None = None
    ) -> pb.ModelVersionInfo | None:
        """``name@version``'s entry in the daemon's listing, or None where the daemon does not list it: from
        ``listing`` (taken earlier) where it shows the version READY, else from a listing taken now. An entry
        listed before READY had its ranks and bytes still being filled in; a missing one may have loaded since."""
        ready = pb.ModelState.Value("READY")
        for v in listing.versions if listing is not None else ():
            if v.name == name and v.version == version and v.state == ready:
                return v
        return next((v for v in self.list().versions if v.name == name and v.version == version), None)

    def status(self) -> pb.StatusResponse:
        return self._call(self.stub.Status, pb.StatusRequest())

    # ---- serving calls --------------------------------------------------------------------

    def attach(
        self, ref: str, rank: int = 0, holder: str = "", on_alias_moved: Callable[[pb.AliasMoved], None] | None = None
    ) -> Attachment:
        """Maps rank ``rank`` of ``ref`` (NAME, NAME@VERSION or alias) and holds a lease on it.

        The lease runs on this client's connection: keep the client open while the attachment (or a
        model bound to it) is in use; ``close()`` releases it."""
        from hotweights.attach import Attachment

        if self._closed:
            raise errors.FailedPrecondition(f"the client of {self.socket} is closed: connect again to attach {ref}")
        try:
            att = Attachment(self, ref, rank, holder=holder, on_alias_moved=on_alias_moved)
        except errors.Unavailable as exc:
            raise self._explained(exc, f"the lease of {ref}") from None
        self._attachments[next(self._attachment_ids)] = att
        return att

    def watch(self, ref: str = "") -> Watch:
        """Events for an alias or model (all when empty): iterate it, ``cancel()`` to stop."""
        return Watch(
            self.stub.Watch(pb.WatchRequest(ref=ref)),
            functools.partial(self._error, what="the watch stream"),
            closed=lambda: self._closed,
            socket=self.socket,
        )

    def follow(self, alias: str, on_change: Callable[[Attachment], None], rank: int = 0, holder: str = "") -> Follower:
        """Attaches to ``alias`` and re-attaches whenever it moves, handing each new mapping to
        ``on_change`` before the previous one is released."""
        return Follower(self, alias, on_change, rank, holder)

    def close(self) -> None:
        """Closes the connection. The leases run on it, so every attachment made through this client
        that still holds one is released first (it then reads ``released``, and indexing it raises);
        tensors already handed out stay readable, but the daemon no longer counts them as in use and
        may free the memory under them. Close the client only once its attachments' models are done."""
        self._closed = True  # before the channel ends the streams on it: a Watch ends quietly
        for att in list(self._attachments.values()):
            att.release()
        self.channel.close()
        with self._operator_lock:
            if self._operator_channel is not None:
                self._operator_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watch:
    """A Watch stream's events. It ends quietly when the caller stops it (``cancel()``, closing the
    iterator, closing the client); a stream the daemon ends raises the call's typed error, and one
    it cancels (a daemon shutting down, or refusing the stream) raises ``Unavailable``: never a
    silent end the caller would take for its own.

    The daemon subscribes the stream a moment after ``Client.watch()`` returns: an event before that
    is not delivered. ``wait_subscribed()`` blocks until it has, so that a change the caller makes
    (or waits for) next is seen::

        watch = client.watch("serving").wait_subscribed()
        client.swap("serving", "/models/llama-v2")
        for ev in watch:  # the swap's events are among these
            ...
    """

    def __init__(
        self,
        call,
        to_error: Callable[[grpc.RpcError], errors.HotweightsError] | None = None,
        closed: Callable[[], bool] = lambda: False,
        socket: str = "",
    ) -> None:
        self._call = call
        self._to_error = to_error or (lambda exc: _cancel_explained(error_from_rpc(exc), socket, "the watch stream"))
        self._closed = closed  # whether the caller closed the channel the stream runs on
        self._socket = socket
        self._cancelled = False
        self._ended: errors.HotweightsError | None = None  # how the daemon ended the stream, once it has

    def __iter__(self) -> Iterator[pb.WatchEvent]:
        if self._ended is not None:  # iterated again after the daemon ended it: the same answer
            raise self._ended
        try:
            yield from self._call
        except grpc.RpcError as exc:
            err = self._to_error(exc)
            if err.details.get("cancelled") and (self._cancelled or self._closed()):
                return  # the caller stopped it
            self._ended = err
            raise err from None
        finally:
            if self._ended is None:
                self.cancel()  # a closed iterator (a break, a caller done with it) stops the stream too

    def wait_subscribed(self, timeout: float | None = 10.0) -> Watch:
        """Blocks until the daemon has subscribed this stream, and returns the watch: every event
        after that reaches the iterator. The daemon says so with the stream's initial metadata.

        A stream that ended first (the daemon refused or cancelled it, or stopped) raises the typed
        error iterating it raises; one the caller stopped returns at once (iterating it then ends).
        ``DeadlineExceeded`` if the daemon has not subscribed it within ``timeout`` seconds (None:
        no limit); the stream stays open then, and may still be iterated or waited for again."""
        if timeout is None:
            self._call.initial_metadata()
        else:
            answered = threading.Event()

            def wait() -> None:
                try:
                    self._call.initial_metadata()  # returns once the call ends, too
                finally:
                    answered.set()

            threading.Thread(target=wait, name="hotweights-watch-subscribed", daemon=True).start()
            if not answered.wait(timeout):
                where = f" on {self._socket}" if self._socket else ""
                raise errors.DeadlineExceeded(
                    f"the hotweights daemon{where} did not subscribe the watch stream within {timeout:g} s; "
                    "it may be overloaded (each stream waits for the daemon's loop to take it)",
                    socket=self._socket,
                    timeout=timeout,
                )
        # A stream that ends without an answer (refused, cancelled) also ends initial_metadata(), with
        # empty metadata, and its status may arrive a moment later: without the daemon's mark of a
        # subscription, the end is waited for a little (a daemon older than the mark never sends it).
        if not any(k == SUBSCRIBED_KEY for k, _ in self._call.initial_metadata() or ()):
            ended = threading.Event()
            self._call.add_done_callback(lambda _call: ended.set())
            ended.wait(_UNMARKED_GRACE_S)
        if self._call.done() and self._call.code() != grpc.StatusCode.OK:  # the call is its own RpcError
            err = self._to_error(self._call)
            if not (err.details.get("cancelled") and (self._cancelled or self._closed())):
                raise err
        return self

    def cancel(self) -> None:
        self._cancelled = True  # before the call ends, so its iterator knows who ended it
        self._call.cancel()


class Follower:
    """Keeps a serving process on whatever version an alias points at.

    ``current`` is the version ``on_change`` last accepted. If ``on_change`` raises, the new version is
    released, ``current`` (still leased) stays what the engine serves, the error is logged, and the
    follower goes on with the alias's next move.
    """

    def __init__(
        self, client: Client, alias: str, on_change: Callable[[Attachment], None], rank: int, holder: str
    ) -> None:
        self._client, self._alias, self._on_change = client, alias, on_change
        self._rank, self._holder = rank, holder
        self._lock = threading.Lock()
        self._moved = threading.Event()
        self._stop = threading.Event()
        self.current = self._attach()
        on_change(self.current)
        self._thread = threading.Thread(target=self._run, name="hotweights-follow", daemon=True)
        self._thread.start()

    def _attach(self) -> Attachment:
        return self._client.attach(
            self._alias, self._rank, holder=self._holder, on_alias_moved=lambda _ev: self._moved.set()
        )

    def _run(self) -> None:
        while True:
            self._moved.wait()  # close() sets it too
            self._moved.clear()
            if self._stop.is_set():
                return
            try:
                new = self._attach()
            except errors.HotweightsError:
                # e.g. the alias is between versions during a drain swap: try again shortly
                self._stop.wait(0.2)
                self._moved.set()
                continue
            if self._stop.is_set():  # closed while attaching: the caller is done with versions
                new.release()
                return
            try:
                self._on_change(new)
            except Exception:
                # The engine could not take the new version and still serves the old one: keep that leased,
                # and follow the next move.
                log.exception("hotweights: on_change refused %s; keeping %s", new.key, self.current.key)
                new.release()
                continue
            with self._lock:
                old, self.current = self.current, new
                closed = self._stop.is_set()
            old.release()
            if closed:
                # close() stopped waiting for a slow on_change and released what was current then: this
                # version is the caller's no longer either
                new.release()
                return

    def close(self, timeout: float = 5.0) -> None:
        """Stops following and releases the current version. Waits up to ``timeout`` seconds for an
        ``on_change`` in progress; one still running then releases its version itself when it returns."""
        self._stop.set()
        self._moved.set()
        self._thread.join(timeout=timeout)
        with self._lock:
            self.current.release()


def _channel(path: str) -> grpc.Channel:
    return grpc.insecure_channel(
        f"unix:{path}",
        options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.enable_retries", 0),
            # a restarted daemon is found again within a fraction of a second
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )


def connect(
    socket: str | None = None, timeout: float = 10.0, origin: str | None = None, operator_socket: str | None = None
) -> Client:
    """A client for the daemon at ``socket`` (default: ``$HOTWEIGHTS_SOCKET``, then the standard paths);
    operator calls go to ``operator_socket`` (default: ``$HOTWEIGHTS_OPERATOR_SOCKET``, else
    ``<socket>.admin``)."""
    return Client(socket, timeout=timeout, origin=origin, operator_socket=operator_socket)


_UNMARKED_GRACE_S = 1.0


def _closed_here(err: errors.Unavailable, what: str) -> errors.FailedPrecondition:
    """A call cancelled because this process closed its client while the call was in flight."""
    # still marked cancelled: a Watch the caller closed under ends quietly on it
    return errors.FailedPrecondition(f"{what} was cut short: this client was closed while it ran", **err.details)


def _cancelled_by_daemon(err: errors.Unavailable, socket: str, what: str = "the call") -> errors.Unavailable:
    """A cancelled call (``error_from_rpc``'s ``cancelled`` Unavailable) as the caller reports it when it
    did not cancel ``what`` itself: the daemon on ``socket`` (its gRPC layer) ended it."""
    where = f" on {socket}" if socket else ""
    message = str(err.details.get("grpc_message") or "no reason given")
    details = {**err.details, "socket": socket} if socket else dict(err.details)
    return errors.Unavailable(
        f"the hotweights daemon{where} cancelled {what} ({message}); it may be shutting down", **details
    )


def _cancel_explained(err: errors.HotweightsError, socket: str, what: str) -> errors.HotweightsError:
    if isinstance(err, errors.Unavailable) and err.details.get("cancelled"):
        return _cancelled_by_daemon(err, socket, what)
    return err


def _layout_applied(info: pb.ModelVersionInfo, asked: str) -> pb.ModelVersionInfo:
    """``info``, once it shows the layout asked for: a daemon older than the layout field drops it
    unread and serves the files' own layout, which an engine would then copy instead of binding."""
    if asked and asked != "none" and info.layout != asked:
        served = f"layout {info.layout}" if info.layout else "the files' own layout"
        raise errors.FailedPrecondition(
            f"the daemon loaded {info.name}@{info.version} without the {asked!r} layout asked for (it serves "
            f"{served}); a daemon older than layouts ignores them: upgrade it, "
            f"then unload and load again",
            ref=f"{info.name}@{info.version}",
            layout=info.layout,
        )
    return info
