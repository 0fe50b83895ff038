"""Core objects to protobuf messages. No logic beyond field mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from hotweights.errors import InvalidArgument
from hotweights.wire.pb import pb
from hotweightsd.core.backend import AllocationMode, HandleType
from hotweightsd.core.events import Event
from hotweightsd.core.leases import Lease
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, ResidentRank

T = TypeVar("T")

_MODE = {AllocationMode.FD: pb.ALLOCATION_FD, AllocationMode.LEGACY_IPC: pb.ALLOCATION_LEGACY_IPC}
MODE_OF = {
    pb.ALLOCATION_MODE_DEFAULT: AllocationMode.FD,
    pb.ALLOCATION_FD: AllocationMode.FD,
    pb.ALLOCATION_LEGACY_IPC: AllocationMode.LEGACY_IPC,
}
VERIFY_OF = {pb.VERIFY_DEFAULT: None, pb.VERIFY_NONE: "none", pb.VERIFY_FAST: "fast", pb.VERIFY_FULL: "full"}
SWAP_OF = {pb.SWAP_MODE_DEFAULT: "side-by-side", pb.SWAP_SIDE_BY_SIDE: "side-by-side", pb.SWAP_DRAIN: "drain"}
KEEP_OF = {pb.KEEP_PREVIOUS_DEFAULT: None, pb.KEEP_PREVIOUS_YES: True, pb.KEEP_PREVIOUS_NO: False}


def enum_arg(table: Mapping[Any, T], number: int, field: str) -> T:
    """The core value of a request's enum field; a number this daemon does not know (proto3 enums are
    open: a newer or broken client can send any) is the client's error, not a KeyError."""
    try:
        return table[number]
    except KeyError:
        known = ", ".join(str(n) for n in sorted(table))
        raise InvalidArgument(f"{field}: unknown enum number {number} (known: {known})", field=field) from None


def version_info(mv: ModelVersion, manager: ModelManager, already_loaded: bool = False) -> pb.ModelVersionInfo:
    return pb.ModelVersionInfo(
        name=mv.name,
        version=mv.version,
        source=mv.source,
        state=pb.ModelState.Value(mv.state.value),
        error=mv.error,
        ranks=[
            pb.RankInfo(
                rank=r.rank,
                device=r.device,
                bytes=r.layout.nbytes,
                tensors=len(r.layout.table()),
                allocations=len(r.allocations),
                resident_bytes=sum(a.size for a in r.allocations),
            )
            for r in mv.ranks
        ],
        bytes=mv.bytes_total,
        leases=len(mv.leases),
        load_seconds=mv.load_seconds,
        load_path=mv.load_path,
        aliases=manager.aliases_of(mv.key),
        created_unix=mv.created,
        allocation=_MODE[mv.mode],
        backend=manager.backend.name,
        already_loaded=already_loaded,
        retired=mv.retire,
        held_until_unix=mv.held_until_unix,
        previous_of=mv.previous_of,
        shares_memory_with=manager.shares_with(mv),
        layout=mv.layout,
    )


def with_ticket(template: pb.GetHandlesResponse, ticket: str, ttl: float) -> pb.GetHandlesResponse:
    out = pb.GetHandlesResponse()
    out.CopyFrom(template)
    out.ticket = ticket
    out.ticket_ttl_seconds = ttl
    return out


def handles_template(mv: ModelVersion, resident: ResidentRank, fd_socket: str, compact: bool) -> pb.GetHandlesResponse:
    """A rank's GetHandles answer without its ticket: the same for every lease of the rank."""
    placements = resident.layout.table()
    out = pb.GetHandlesResponse(
        name=mv.name,
        version=mv.version,
        rank=resident.rank,
        world_size=mv.world_size,
        allocations=_allocations(resident),
        fd_socket=fd_socket,
    )
    if compact:
        out.table.CopyFrom(
            pb.TensorTable(
                name=[p.name for p in placements],
                dtype=[p.dtype for p in placements],
                served_dtype=[p.served_dtype for p in placements],
                allocation=[p.allocation for p in placements],
                offset=[p.offset for p in placements],
                nbytes=[p.nbytes for p in placements],
                ndim=[len(p.shape) for p in placements],
                dims=[d for p in placements for d in p.shape],
            )
        )
    else:
        out.tensors.extend(
            pb.TensorInfo(
                name=p.name,
                dtype=p.dtype,
                shape=list(p.shape),
                strides=list(p.strides),
                allocation=p.allocation,
                offset=p.offset,
                nbytes=p.nbytes,
                served_dtype=p.served_dtype,
            )
            for p in placements
        )
    return out


def _allocations(resident: ResidentRank) -> list[pb.AllocationInfo]:
    allocations = []
    for i, a in enumerate(resident.allocations):
        host = a.handle_type is HandleType.MEMFD
        info = pb.AllocationInfo(
            index=i,
            size=a.size,
            handle_type=pb.HandleType.Value(a.handle_type.value),
            device=-1 if host else a.device,
            device_bus_id=a.device_bus_id,
        )
        if a.handle_type is HandleType.CUDA_IPC:
            info.ipc_handle = a.ipc_handle()
        allocations.append(info)
    return allocations


def lease_info(lease: Lease) -> pb.LeaseInfo:
    return pb.LeaseInfo(
        lease_id=lease.id,
        name=lease.name,
        version=lease.version,
        pid=lease.pid,
        uid=lease.uid,
        holder=lease.holder,
        started_unix=lease.started,
        ref=lease.ref,
    )


def aliases(manager: ModelManager) -> list[pb.AliasInfo]:
    out = []
    for alias, key in sorted(manager.aliases().items()):
        name, _, version = key.partition("@")
        out.append(pb.AliasInfo(alias=alias, name=name, version=version))
    return out


def watch_event(ev: Event) -> pb.WatchEvent:
    return pb.WatchEvent(
        kind=pb.WatchEvent.Kind.Value(ev.kind.value),
        name=ev.name,
        version=ev.version,
        alias=ev.alias,
        old_version=ev.old_version,
        message=ev.message,
        time_unix=ev.time,
        seq=ev.seq,
    )
