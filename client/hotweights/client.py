"""The client library: what serving processes and operators import."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from hotweights import errors
from hotweights.paths import default_socket
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import error_from_rpc

if TYPE_CHECKING:  # torch is imported only by processes that attach
    from hotweights.attach import Attachment

_VERIFY = {None: pb.VERIFY_DEFAULT, "none": pb.VERIFY_NONE, "fast": pb.VERIFY_FAST, "full": pb.VERIFY_FULL}
_ALLOC = {"fd": pb.ALLOCATION_FD, "legacy_ipc": pb.ALLOCATION_LEGACY_IPC, None: pb.ALLOCATION_MODE_DEFAULT}
_SWAP = {"side-by-side": pb.SWAP_SIDE_BY_SIDE, "drain": pb.SWAP_DRAIN, None: pb.SWAP_MODE_DEFAULT}

ProgressFn = Callable[[int, int], None]


def _choice(table: dict, value, what: str):
    try:
        return table[value]
    except KeyError:
        raise errors.InvalidArgument(f"{what} must be one of {[k for k in table if k]}, got {value!r}") from None


class Client:
    """A connection to the node's hotweights daemon over its unix socket."""

    def __init__(self, socket: str | None = None, timeout: float = 10.0) -> None:
        self.socket = socket or default_socket()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            f"unix:{self.socket}",
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.enable_retries", 0),
                # a restarted daemon is found again within a fraction of a second
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.stub = pb_grpc.HotweightsStub(self.channel)

    def _call(self, method, request, timeout: float | None = -1):
        try:
            return method(request, timeout=self.timeout if timeout == -1 else timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def wait_ready(self, timeout: float = 10.0) -> Client:
        """Blocks until the daemon answers, or raises Unavailable."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(
                f"no hotweights daemon answers on {self.socket} (start one with `hotweights serve`)"
            ) from None
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
    ) -> pb.ModelVersionInfo:
        """Loads a checkpoint as ``name@version``; returns the version's info once READY (or registered)."""
        req = pb.LoadModelRequest(
            name=name,
            path=os.path.abspath(os.fspath(path)),
            version=version or "",
            alias=alias or "",
            verify=_choice(_VERIFY, verify, "verify"),
            allocation=_choice(_ALLOC, allocation, "allocation"),
            device_map=list(device_map),
            wait=wait,
        )
        return self._stream_load(self.stub.LoadModel, req, progress)

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
    ) -> pb.ModelVersionInfo:
        """Points ``alias`` at ``NAME@VERSION``, or at a new version loaded from a path."""
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
        )
        return self._stream_load(self.stub.SwapModel, req, progress)

    def _stream_load(self, method, req, progress: ProgressFn | None) -> pb.ModelVersionInfo:
        try:
            for ev in method(req):
                if ev.WhichOneof("event") == "progress":
                    if progress is not None:
                        progress(ev.progress.bytes_done, ev.progress.bytes_total)
                else:
                    return ev.done
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        raise errors.Internal("the daemon ended the load stream without a result")

    def unload(self, ref: str, force: bool = False) -> pb.UnloadModelResponse:
        return self._call(self.stub.UnloadModel, pb.UnloadModelRequest(ref=ref, force=force), timeout=None)

    def set_alias(self, alias: str, target: str) -> pb.AliasInfo:
        return self._call(self.stub.SetAlias, pb.SetAliasRequest(alias=alias, target=target)).alias

    def remove_alias(self, alias: str) -> pb.AliasInfo:
        return self._call(self.stub.SetAlias, pb.SetAliasRequest(alias=alias, target="")).alias

    def list(self) -> pb.ListModelsResponse:
        return self._call(self.stub.ListModels, pb.ListModelsRequest())

    def status(self) -> pb.StatusResponse:
        return self._call(self.stub.Status, pb.StatusRequest())

    # ---- serving calls --------------------------------------------------------------------

    def attach(
        self, ref: str, rank: int = 0, holder: str = "", on_alias_moved: Callable[[pb.AliasMoved], None] | None = None
    ) -> Attachment:
        """Maps rank ``rank`` of ``ref`` (NAME, NAME@VERSION or alias) and holds a lease on it."""
        from hotweights.attach import Attachment

        return Attachment(self, ref, rank, holder=holder, on_alias_moved=on_alias_moved)

    def watch(self, ref: str = "") -> Watch:
        """Events for an alias or model (all when empty): iterate it, ``cancel()`` to stop."""
        return Watch(self.stub.Watch(pb.WatchRequest(ref=ref)))

    def follow(self, alias: str, on_change: Callable[[Attachment], None], rank: int = 0, holder: str = "") -> Follower:
        """Attaches to ``alias`` and re-attaches whenever it moves, handing each new mapping to
        ``on_change`` before the previous one is released."""
        return Follower(self, alias, on_change, rank, holder)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watch:
    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[pb.WatchEvent]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        self._call.cancel()


class Follower:
    """Keeps a serving process on whatever version an alias points at."""

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
            with self._lock:
                old, self.current = self.current, new
            self._on_change(new)
            old.release()

    def close(self) -> None:
        self._stop.set()
        self._moved.set()
        self._thread.join(timeout=5)
        with self._lock:
            self.current.release()


def connect(socket: str | None = None, timeout: float = 10.0) -> Client:
    """A client for the daemon at ``socket`` (default: ``$HOTWEIGHTS_SOCKET``, then the standard paths)."""
    return Client(socket, timeout=timeout)
