"""An attachment: a read-only mapping of tensor names to zero-copy tensors, held by a lease.

The lease is a gRPC stream opened before any memory is mapped and kept until ``release()``, the
end of a ``with`` block, garbage collection or process exit; the daemon notices each of these.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import grpc
import torch

from hotweights import errors
from hotweights.mapping.regions import Region, open_region
from hotweights.mapping.table import Table, TensorMeta, build_tensors
from hotweights.paths import fd_socket_beside
from hotweights.wire.fdproto import fetch_fds
from hotweights.wire.pb import pb
from hotweights.wire.status import CALL_ERRORS, error_from_rpc


class Connection(Protocol):
    """What an attachment needs of its client: the daemon's stub and the socket path it connected to
    (a ``hotweights.Client`` has both)."""

    stub: Any
    socket: str


class LeaseStream:
    """The client end of one Lease stream, with a thread that reads the daemon's events.

    If the daemon goes away (a restart), the thread re-leases the same ``NAME@VERSION`` once a
    daemon answers again, so a restarted daemon knows the memory is still in use, and goes on
    following the alias it attached through (a move made while the daemon was away is reported then).
    """

    RELEASE_RETRY_SECONDS = 120.0

    def __init__(
        self,
        stub,
        ref: str,
        holder: str,
        on_alias_moved: Callable[[pb.AliasMoved], None] | None,
        rank: int | None = None,
    ) -> None:
        self._stub = stub
        self._ref = ref
        self._rank = rank
        self._holder = holder
        self._release = threading.Event()
        self._on_alias_moved = on_alias_moved
        self.relets = 0
        # Why the lease ended without a release() (the version gone from a restarted daemon, the channel
        # under it closed, no daemon answering again); None while it holds.
        self.lost_error: errors.HotweightsError | None = None
        try:
            self.granted = self._open(ref, with_handles=rank is not None)
        except grpc.RpcError as exc:
            self._release.set()
            raise error_from_rpc(exc) from None
        except BaseException:
            # an interrupt (or a closed channel) mid-open: end the request stream, or a lease the daemon
            # may already have granted stays open until the process exits
            self._release.set()
            cancel = getattr(getattr(self, "_responses", None), "cancel", None)
            if cancel is not None:
                cancel()
            raise
        self._thread = threading.Thread(target=self._pump, name="hotweights-lease", daemon=True)
        self._thread.start()

    def _open(self, ref: str, with_handles: bool = False, follow: str = "") -> pb.LeaseGranted:
        open_msg = pb.LeaseRequest(
            open=pb.LeaseOpen(
                ref=ref,
                pid=os.getpid(),
                holder=self._holder,
                with_handles=with_handles,
                rank=self._rank or 0,
                compact_table=True,
                follow=follow,
            )
        )

        def requests():
            yield open_msg
            self._release.wait()
            yield pb.LeaseRequest(release=pb.LeaseRelease())

        self._responses = self._stub.Lease(requests())
        return next(self._responses).granted

    def _pump(self) -> None:
        while True:
            try:
                for ev in self._responses:
                    if ev.WhichOneof("event") == "alias_moved" and self._on_alias_moved is not None:
                        self._on_alias_moved(ev.alias_moved)
                return  # ended after our release
            except grpc.RpcError:
                pass
            if self._release.is_set() or not self._relet():
                return

    @property
    def lost(self) -> str | None:
        """``lost_error``'s message, or None while the lease holds."""
        return None if self.lost_error is None else self.lost_error.message

    def _relet(self) -> bool:
        key = f"{self.granted.name}@{self.granted.version}"
        deadline = time.monotonic() + self.RELEASE_RETRY_SECONDS
        last: errors.HotweightsError | None = None
        while not self._release.is_set() and time.monotonic() < deadline:
            try:
                # the mapping is already there: no handles needed
                self._open(key, follow=self._ref if self._ref != key else "")
                self.relets += 1
                return True
            except CALL_ERRORS as exc:
                err = last = error_from_rpc(exc)
                if isinstance(err, errors.FailedPrecondition) and err.details.get("closed_channel"):
                    # nothing can re-lease through a closed channel
                    self.lost_error = _restated(err, "the client it was made through was closed", ref=key)
                    return False
                if not (isinstance(err, errors.Unavailable) and err.details.get("transport")):
                    # the daemon answered: the version is gone, nothing is left to hold, its memory may be freed
                    self.lost_error = _restated(err, f"the daemon no longer leases {key} ({err})", ref=key)
                    return False
            self._release.wait(0.1)  # no daemon answers (yet), or it cancelled the call: try again
        if not self._release.is_set():
            self.lost_error = errors.Unavailable(
                f"no daemon answered at the socket for {self.RELEASE_RETRY_SECONDS:g} s to lease {key} again",
                ref=key,
            )
            self.lost_error.__cause__ = last
        return False

    def release(self, timeout: float = 5.0) -> None:
        self._release.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def _restated(err: errors.HotweightsError, message: str, **more: Any) -> errors.HotweightsError:
    """An error of ``err``'s class and details (and ``more``) with ``message``, caused by ``err``: what
    the lease says of a failure, in its own words around the call's."""
    cls = type(err)
    new = cls.__new__(cls)  # not cls(...): BackendError's constructor takes other arguments
    errors.HotweightsError.__init__(new, message, **{**err.details, **more})
    for key, value in vars(err).items():
        if key not in ("message", "details"):
            setattr(new, key, value)
    new.__cause__ = err
    return new


class Attachment(Mapping[str, torch.Tensor]):
    """Tensors of one rank of one model version, mapped from the daemon's memory without a copy.

    The tensors alias shared, read-only memory: writing to one faults. They stay valid after
    ``release()`` for as long as they are referenced (the mapping goes with the last of them), but the
    daemon may then free (or, on the cuda backend, reuse) the memory under them. The lease runs on the
    client's channel: closing the client releases its attachments (see ``Client.close``).
    """

    def __init__(
        self,
        client: Connection,
        ref: str,
        rank: int = 0,
        holder: str = "",
        on_alias_moved: Callable[[pb.AliasMoved], None] | None = None,
    ) -> None:
        self.ref = ref
        self.rank = rank
        t0 = time.perf_counter()
        self._lease: LeaseStream | None = LeaseStream(client.stub, ref, holder, on_alias_moved, rank=rank)
        self._regions: list[Region] = []
        try:
            g = self._lease.granted
            self.lease_id, self.name, self.version, self.world_size = g.lease_id, g.name, g.version, g.world_size
            h = g.handles  # the lease came with this rank's handles: one round trip, not two
            t1 = time.perf_counter()
            self._regions = self._map(h, fd_socket_beside(client.socket, h.fd_socket))
            t2 = time.perf_counter()
            self._table = Table.from_pb(h.table) if h.HasField("table") else Table.from_rows(h.tensors)
            self._tensors = build_tensors(self._table, [r.base for r in self._regions])
            # where an attach spends its time (benchmarks report it)
            self.timings = {"lease_and_table_s": t1 - t0, "map_s": t2 - t1, "build_s": time.perf_counter() - t2}
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _map(h: pb.GetHandlesResponse, fd_socket: str) -> list[Region]:
        needs_fd = [a for a in h.allocations if a.handle_type != pb.CUDA_IPC]
        fds = fetch_fds(fd_socket, h.ticket, len(needs_fd)) if needs_fd else []
        regions: list[Region] = []
        try:
            it = iter(fds)
            for a in h.allocations:
                kind = pb.HandleType.Name(a.handle_type)
                fd = None if a.handle_type == pb.CUDA_IPC else next(it)
                regions.append(open_region(kind, a.size, a.device, fd, a.ipc_handle, a.device_bus_id))
        except BaseException:
            for r in regions:
                r.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return regions

    @functools.cached_property
    def meta(self) -> dict[str, TensorMeta]:
        """The tensor table: safetensors dtype, shape and placement of every tensor."""
        return self._table.meta()

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        if self.released:
            lease = self._lease
            lost = lease.lost_error if lease is not None else None
            why = f": {lost}" if lost is not None else ""
            raise errors.FailedPrecondition(f"attachment of {self.key} was released{why}", ref=self.key) from lost
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(getattr(self, "_tensors", {}))

    def __len__(self) -> int:
        return len(getattr(self, "_tensors", {}))

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def released(self) -> bool:
        """True once the lease has ended: ``release()``, the client it was made through closed, or a
        daemon restart after which the version could not be leased again."""
        lease = self._lease
        return lease is None or lease.lost_error is not None

    def release(self) -> None:
        """Ends the lease. Tensors already handed out stay readable while referenced."""
        lease, self._lease = getattr(self, "_lease", None), None
        self._tensors = {}
        for r in getattr(self, "_regions", []):
            r.close()
        self._regions = []
        if lease is not None:
            lease.release()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "released" if self.released else f"{len(self)} tensors"
        return f"<Attachment {getattr(self, 'name', '?')}@{getattr(self, 'version', '?')} rank {self.rank}: {state}>"
