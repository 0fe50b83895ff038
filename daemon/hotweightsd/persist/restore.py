"""Restoring the registry at start from the state file and the fds the service manager hands back, or
planning the reloads from storage where they cannot be served (see fdstore.py for what is stored)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import structlog

from hotweights.errors import DataLoss, HotweightsError
from hotweights.format.dtypes import lookup
from hotweightsd.core.backend import AllocationMode, HandleType, MemoryBackend
from hotweightsd.core.content import ContentId
from hotweightsd.core.layout import RankLayout
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, ResidentRank
from hotweightsd.persist import statefile, systemd
from hotweightsd.persist.fdstore import Persister, placement_from_row

log = structlog.get_logger("hotweightsd.persist.restore")


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)
    to_reload: list[dict] = field(default_factory=list)
    note: str = ""
    # aliases the state file names with no version of theirs in it: not restored, and said why (alias ->
    # the line status shows; keyed by the alias, whose return clears that line)
    dropped_aliases: dict[str, str] = field(default_factory=dict)


class _Foreign(Exception):
    def __init__(self, owner: str) -> None:
        self.owner = owner


def _drop_received(received: dict[str, list[int]]) -> None:
    """Closes fds that will not be served and takes them out of the fd store."""
    for name, fds in received.items():
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        systemd.remove_fds(name)


def restore(
    manager: ModelManager, backend: MemoryBackend, persister: Persister, received: dict[str, list[int]]
) -> RestoreReport:
    """Rebuilds the registry from the state file and the fds handed back, or plans a reload.

    Nothing is served from fds that do not match the state file exactly: where the fds handed back are
    not the ones the file names, all of them are closed and dropped from the store; where one version's
    entry does not describe its fds, that version's are, and it is reloaded from storage. The reason is
    logged and reported.
    """
    path = persister.state_path
    report = RestoreReport()
    if not path.exists():
        if received:
            _drop_received(received)
            report.note = f"fd store held {len(received)} fd(s) but no state file {path} describes them: dropped"
            log.error("restore.refused", reason=report.note)
        return report
    try:
        doc = statefile.load(path)
        owner = doc.get("socket")
        if not isinstance(owner, str):
            raise DataLoss(f"state file {path} names no socket: it was not written by a daemon of this version")
        if owner != persister.socket:
            raise _Foreign(owner)
        versions = doc.get("versions", [])
        aliases = doc.get("aliases", {})
    except _Foreign as foreign:
        _drop_received(received)
        report.note = (
            f"state file {path} belongs to the daemon on {foreign.owner}, not to "
            f"{persister.socket}: not restored and not overwritten; started empty (give each socket its own name)"
        )
        persister.refuse(report.note)
        log.error("restore.refused", reason=report.note)
        return report
    except DataLoss as exc:
        _drop_received(received)
        path.rename(path.with_suffix(".corrupt"))
        report.note = f"{exc}; started empty (kept as {path.with_suffix('.corrupt').name})"
        log.error("restore.refused", reason=report.note)
        return report

    held = {f"{v['name']}@{v['version']}" for v in versions}
    for alias, key in sorted(aliases.items()):
        if key not in held:  # a drain swap freed its version, and the next one failed to load
            report.dropped_aliases[alias] = (
                f"alias {alias!r} named {key}, of which the state file holds no version: not restored; "
                f"`hotweights swap {alias} PATH --create --name {key.partition('@')[0]}` makes it again"
            )
    if report.dropped_aliases:
        log.warning("restore.alias_dropped", aliases=list(report.dropped_aliases.values()))

    def reload(vs: list[dict]) -> None:
        """Plans a reload from storage of each of ``vs`` not retired; the state file keeps them until it settles."""
        live = [v for v in vs if not v.get("retire")]
        report.to_reload += [
            {
                "name": v["name"],
                "path": v["source"],
                "version": v["version"],
                "layout": v.get("layout", ""),
                "aliases": sorted(a for a, k in aliases.items() if k == f"{v['name']}@{v['version']}"),
            }
            for v in live
        ]
        persister.carry(live, aliases)

    # A retired version is only worth its memory while it is resident: it is never read again.
    retired = [v for v in versions if v.get("retire")]
    if retired and not received:
        log.info("restore.retired_not_reloaded", versions=[f"{v['name']}@{v['version']}" for v in retired])
    stored = [v for v in versions if v["ranks"] and all(r["fd_names"] for r in v["ranks"])]
    if not received:
        reload(versions)
        if report.to_reload:
            report.note = f"no fd store handed anything back: reloading {len(report.to_reload)} version(s) from storage"
            log.warning(
                "restore.reload_from_storage", versions=[f"{v['name']}@{v['version']}" for v in report.to_reload]
            )
        return report
    reload([v for v in versions if v not in stored])
    versions = stored

    expected = {n: 1 for v in versions for r in v["ranks"] for n in r["fd_names"]}
    mismatch = statefile.match_fds(expected, received)
    if not mismatch.ok:
        _drop_received(received)
        reload(versions)
        report.note = f"state file {path} disagrees with the fds handed back: {mismatch.describe()}; dropped them" + (
            f", reloading {len(report.to_reload)} version(s) from storage" if report.to_reload else ""
        )
        log.error("restore.refused", reason=report.note)
        return report

    adopted: list[tuple[ModelVersion, list[str]]] = []
    refused: list[tuple[dict, str]] = []
    for v in versions:
        names = [n for r in v["ranks"] for n in r["fd_names"]]
        try:
            mv = _rebuild(v, backend, received, {m.key: m for m, _ in adopted})
        except (HotweightsError, LookupError, TypeError, ValueError, AttributeError, OSError) as exc:
            # One version's entry that does not describe its fds costs that version alone: its fds are
            # closed and dropped from the store, and it is read from storage again like one never stored.
            _drop_received({n: received.pop(n, []) for n in names})
            refused.append((v, f"{exc}"))
            log.error("restore.version_refused", model=f"{v.get('name')}@{v.get('version')}", reason=f"{exc}")
            continue
        adopted.append((mv, names))
    for mv, names in adopted:
        manager.adopt_version(mv, sorted(a for a, k in aliases.items() if k == mv.key))
        persister.adopted(mv.key, names)
        report.restored.append(mv.key)
    before = len(report.to_reload)
    reload([v for v, _ in refused])
    report.note = f"restored {len(adopted)} version(s) from the fd store without reading storage"
    if refused:
        why = "; ".join(f"{v.get('name')}@{v.get('version')}: {reason}" for v, reason in refused)
        report.note += (
            f"; {len(refused)} did not match the fds handed back and were dropped"
            f"{' (reloading from storage)' if len(report.to_reload) > before else ''}: {why}"
        )
    log.info("restore.done", versions=report.restored)
    return report


def _rebuild(
    v: dict, backend: MemoryBackend, received: dict[str, list[int]], rebuilt: dict[str, ModelVersion]
) -> ModelVersion:
    """The version ``v`` describes, on the fds handed back; on the allocations of the version it
    shared memory with before the restart when that one is in ``rebuilt`` and matches."""
    mv = ModelVersion(
        name=v["name"],
        version=v["version"],
        source=v["source"],
        world_size=v["world_size"],
        mode=AllocationMode(v["mode"]),
        created=v["created"],
        load_seconds=v["load_seconds"],
        load_path=v["load_path"],
        retire=v.get("retire", False),
        held_until_unix=v.get("held_until", 0.0),
        previous_of=v.get("previous_of", ""),
        bytes_total=v["bytes_total"],
        content=ContentId.from_json(v.get("content")),  # absent in state files written before it existed
        shares=v.get("shares", ""),
        layout=v.get("layout", ""),
    )
    source = rebuilt.get(v.get("shares_allocations") or "")
    if source is not None and not _same_allocations(source, v):
        log.warning("restore.not_shared", model=mv.key, source=source.key, reason="allocations differ")
        source = None
    if source is None:
        mv.shares = ""  # it holds the memory of its own fds now, whatever it shared before
    try:
        _rebuild_ranks(mv, v, backend, received, source)
    except BaseException:
        if source is None:  # the ranks adopted so far are this version's own (a source's stay the source's)
            for rank in mv.ranks:
                for a in rank.allocations:
                    a.close()
        raise
    return mv


def _rebuild_ranks(
    mv: ModelVersion,
    v: dict,
    backend: MemoryBackend,
    received: dict[str, list[int]],
    source: ModelVersion | None,
) -> None:
    """Adds each rank ``v`` describes to ``mv``: on ``source``'s allocations, or on the fds handed back."""
    for r in v["ranks"]:
        layout = RankLayout(
            rank=r["rank"],
            files=r["files"],
            allocation_sizes=r["allocation_sizes"],
            placements=[placement_from_row(p) for p in r["placements"]],
            served=[placement_from_row(p) for p in r["served"]] if "served" in r else None,
        )
        # A version in a layout may have none (a checkpoint in the engine's layout already: nothing to
        # fuse); one without a layout never has one.
        if layout.served is not None and not mv.layout:
            raise DataLoss(f"{mv.key}: a served table is recorded only for a version in an engine layout")
        for p in layout.placements + (layout.served or []):
            if (
                p.allocation >= len(layout.allocation_sizes)
                or p.offset + p.nbytes > layout.allocation_sizes[p.allocation]
            ):
                raise DataLoss(f"tensor {p.name!r} of {mv.key} lies outside its allocation")
        for p in layout.served or []:
            if p.nbytes * 8 != math.prod(p.shape) * lookup(p.dtype).bits:
                raise DataLoss(f"served tensor {p.name!r} of {mv.key}: {p.nbytes} bytes for {p.dtype} {list(p.shape)}")
        if source is not None:
            # The same memory as ``source``'s: this version's own fds are duplicates. Closed here, but
            # left in the fd store, which keeps the memory alive whichever of the two goes first.
            for name in r["fd_names"]:
                os.close(received[name].pop())
            mv.ranks.append(ResidentRank(r["rank"], r["device"], layout, list(source.rank(r["rank"]).allocations)))
            continue
        allocs = []
        try:
            for _i, (size, kind, name) in enumerate(zip(r["allocation_sizes"], r["handle_types"], r["fd_names"])):
                fd = received[name].pop()
                allocs.append(backend.adopt(r["device"], size, HandleType(kind), fd))
        except BaseException:
            for a in allocs:
                a.close()
            raise
        mv.ranks.append(ResidentRank(r["rank"], r["device"], layout, allocs))


def _same_allocations(source: ModelVersion, v: dict) -> bool:
    """Whether ``source``'s allocations are the ones ``v`` describes: ranks, devices, count, sizes."""
    if sorted(r.rank for r in source.ranks) != sorted(r["rank"] for r in v["ranks"]):
        return False
    for r in v["ranks"]:
        mine = source.rank(r["rank"])
        if (
            mine.device != r["device"]
            or [a.size for a in mine.allocations] != list(r["allocation_sizes"])
            or [a.handle_type.value for a in mine.allocations] != list(r["handle_types"])
            or len(r["fd_names"]) != len(mine.allocations)
        ):
            return False
    return True
