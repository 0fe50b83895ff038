"""Surviving a daemon restart: the fd store, the state file beside it, and restoring from both.

Under systemd each exportable allocation's fd goes to the service manager's fd store the moment
its version is READY, so even a SIGKILL keeps the memory alive; the state file (registry, tensor
tables, aliases) is rewritten on every change. On start the daemon gets the fds back, checks them
against the state file and serves again without touching storage. Without an fd store the state
file still lets a restart reload the same versions from storage, and it says so.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from hotweights.errors import DataLoss, HotweightsError
from hotweightsd.core.backend import AllocationMode, HandleType, MemoryBackend
from hotweightsd.core.events import Event, EventKind
from hotweightsd.core.layout import Placement, RankLayout
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, ResidentRank, State
from hotweightsd.persist import statefile, systemd

log = structlog.get_logger("hotweightsd.persist.fdstore")
STATE_NAME = "hotweights-state.json"


def fd_name(key: str, rank: int, index: int) -> str:
    return f"hw/{key}/{rank}/{index}"


def _encode_version(mv: ModelVersion, names: list[list[str]]) -> dict:
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
        "bytes_total": mv.bytes_total,
        "ranks": [
            {
                "rank": r.rank,
                "device": r.device,
                "files": r.layout.files,
                "allocation_sizes": r.layout.allocation_sizes,
                "handle_types": [a.handle_type.value for a in r.allocations],
                "fd_names": names[i],
                "placements": [
                    [
                        p.name,
                        p.dtype,
                        p.served_dtype,
                        list(p.shape),
                        p.allocation,
                        p.offset,
                        p.nbytes,
                        p.file,
                        p.file_offset,
                    ]
                    for p in r.layout.placements
                ],
            }
            for i, r in enumerate(mv.ranks)
        ],
    }


class Persister:
    """Keeps the fd store and the state file in step with the registry (subscribed to its events)."""

    def __init__(self, manager: ModelManager, state_path: Path, fdstore: bool) -> None:
        self.m = manager
        self.state_path = state_path
        self.fdstore = fdstore
        self._stored: dict[str, list[str]] = {}  # version key -> fd names in the store
        self._lock = threading.Lock()
        self._unsubscribe = manager.events.subscribe(self._on_event)

    def adopted(self, key: str, names: list[str]) -> None:
        with self._lock:
            self._stored[key] = names

    def _on_event(self, ev: Event) -> None:
        key = f"{ev.name}@{ev.version}"
        try:
            if ev.kind is EventKind.VERSION_READY:
                self._store(key)
            elif ev.kind is EventKind.VERSION_FREED:
                self._forget(key)
            elif ev.kind not in (EventKind.ALIAS_MOVED, EventKind.ALIAS_REMOVED):
                return
            self.save()
        except HotweightsError as exc:
            log.error("persist.failed", event=ev.kind.value, model=key, error=str(exc))

    def _store(self, key: str) -> None:
        if not self.fdstore:
            return
        name, _, version = key.partition("@")
        mv = self.m.get(name, version)
        if mv.mode is not AllocationMode.FD:
            log.info("persist.not_stored", model=key, reason="legacy IPC memory dies with the daemon")
            return
        names = []
        for r in mv.ranks:
            for i, a in enumerate(r.allocations):
                names.append(fd_name(key, r.rank, i))
                fd = a.export_fd()
                try:
                    systemd.store_fds(names[-1], [fd])
                finally:
                    os.close(fd)
        with self._lock:
            self._stored[key] = names
        log.info("persist.stored", model=key, fds=len(names))

    def _forget(self, key: str) -> None:
        with self._lock:
            names = self._stored.pop(key, [])
        for n in names:
            systemd.remove_fds(n)

    def snapshot(self) -> dict:
        with self._lock:
            stored = dict(self._stored)
        versions = []
        for mv in self.m.versions():
            if mv.state is not State.READY or mv.freed:
                continue
            names = [
                [fd_name(mv.key, r.rank, i) for i in range(len(r.allocations))] if mv.key in stored else []
                for r in mv.ranks
            ]
            versions.append(_encode_version(mv, names))
        return {"versions": versions, "aliases": self.m.aliases()}

    def save(self) -> None:
        statefile.save(self.state_path, self.snapshot())

    def close(self) -> None:
        self._unsubscribe()


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)
    to_reload: list[dict] = field(default_factory=list)
    note: str = ""


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

    Nothing is served from fds that do not match the state file exactly: on any disagreement all
    of them are closed and dropped from the store, and the reason is logged and reported.
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
        versions = doc.get("versions", [])
        aliases = doc.get("aliases", {})
    except DataLoss as exc:
        _drop_received(received)
        path.rename(path.with_suffix(".corrupt"))
        report.note = f"{exc}; started empty (kept as {path.with_suffix('.corrupt').name})"
        log.error("restore.refused", reason=report.note)
        return report

    def reload(vs: list[dict]) -> list[dict]:
        return [
            {
                "name": v["name"],
                "path": v["source"],
                "version": v["version"],
                "aliases": sorted(a for a, k in aliases.items() if k == f"{v['name']}@{v['version']}"),
            }
            for v in vs
        ]

    stored = [v for v in versions if v["ranks"] and all(r["fd_names"] for r in v["ranks"])]
    if not received:
        report.to_reload = reload(versions)
        if report.to_reload:
            report.note = f"no fd store handed anything back: reloading {len(report.to_reload)} version(s) from storage"
            log.warning("restore.reload_from_storage", versions=[f"{v['name']}@{v['version']}" for v in versions])
        return report
    report.to_reload = reload([v for v in versions if v not in stored])
    versions = stored

    expected = {n: 1 for v in versions for r in v["ranks"] for n in r["fd_names"]}
    mismatch = statefile.match_fds(expected, received)
    if not mismatch.ok:
        _drop_received(received)
        report.note = f"state file {path} disagrees with the fds handed back: {mismatch.describe()}; started empty"
        log.error("restore.refused", reason=report.note)
        return report

    adopted: list[tuple[ModelVersion, list[str]]] = []
    try:
        for v in versions:
            mv = _rebuild(v, backend, received)
            adopted.append((mv, [n for r in v["ranks"] for n in r["fd_names"]]))
    except (HotweightsError, KeyError, TypeError, ValueError, OSError) as exc:
        for mv, _ in adopted:
            for r in mv.ranks:
                for a in r.allocations:
                    a.close()
        _drop_received(received)
        report.note = f"state file {path} does not describe the fds handed back ({exc}); started empty"
        log.error("restore.refused", reason=report.note)
        return report
    for mv, names in adopted:
        manager.adopt_version(mv, sorted(a for a, k in aliases.items() if k == mv.key))
        persister.adopted(mv.key, names)
        report.restored.append(mv.key)
    report.note = f"restored {len(adopted)} version(s) from the fd store without reading storage"
    log.info("restore.done", versions=report.restored)
    return report


def _rebuild(v: dict, backend: MemoryBackend, received: dict[str, list[int]]) -> ModelVersion:
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
        bytes_total=v["bytes_total"],
    )
    for r in v["ranks"]:
        layout = RankLayout(
            rank=r["rank"],
            files=r["files"],
            allocation_sizes=r["allocation_sizes"],
            placements=[
                Placement(p[0], p[1], p[2], tuple(p[3]), p[4], p[5], p[6], p[7], p[8]) for p in r["placements"]
            ],
        )
        for p in layout.placements:
            if (
                p.allocation >= len(layout.allocation_sizes)
                or p.offset + p.nbytes > layout.allocation_sizes[p.allocation]
            ):
                raise DataLoss(f"tensor {p.name!r} of {mv.key} lies outside its allocation")
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
    return mv
