"""Models, versions and aliases: the data the daemon serves, with no policy."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

from hotweights.errors import InvalidArgument, shorten
from hotweightsd.core.backend import Allocation, AllocationMode
from hotweightsd.core.content import ContentId
from hotweightsd.core.layout import RankLayout

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid {kind} {shorten(value)!r}: use 1-128 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return value


def split_ref(ref: str) -> tuple[str, str | None]:
    """``NAME@VERSION`` -> (NAME, VERSION); ``NAME`` -> (NAME, None)."""
    if not ref:
        raise InvalidArgument("empty model reference: give NAME, NAME@VERSION or an alias")
    name, _, version = ref.partition("@")
    check_name("model name", name)
    if "@" in ref:
        check_name("version", version)
        return name, version
    return name, None


class State(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"
    DRAINING = "DRAINING"


@dataclass
class ResidentRank:
    rank: int
    device: int
    layout: RankLayout
    allocations: list[Allocation]
    # This rank's fill: seconds and the backend's description of how it read (set when it finished).
    load_seconds: float = 0.0
    load_path: str = ""


@dataclass
class ModelVersion:
    name: str
    version: str
    source: str
    world_size: int
    mode: AllocationMode = AllocationMode.FD
    state: State = State.LOADING
    error: str = ""
    ranks: list[ResidentRank] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    load_path: str = ""
    leases: set[str] = field(default_factory=set)
    # Set when the version should go once its last lease ends (swapped out, or unloaded while leased).
    retire: bool = False
    # A retired version is not freed before these (time.monotonic()); 0: no hold.
    # hold_until: kept resident as the previous version of the alias ``previous_of`` (swap --keep-previous).
    # relet_until: restored after a restart, waiting for the clients that held it to lease it again.
    hold_until: float = 0.0
    held_until_unix: float = 0.0
    previous_of: str = ""
    relet_until: float = 0.0
    bytes_total: int = 0
    bytes_done: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    # Set once its load has ended either way and what it decided has been carried out (a failed load's
    # memory freed): a load waiting to share this one's read decides only then.
    settled: threading.Event = field(default_factory=threading.Event)
    # What it was read from (fingerprint and file stats), to recognise a repeated load of the same content.
    content: ContentId | None = None
    # The version whose memory this one was given instead of reading its files (the same files
    # under another name), as it was at load time; "" when it read its own. Informational (the
    # manager's shares_with says whether it still shares): the allocations are shared by identity,
    # and each is freed once no registered version holds it.
    shares: str = ""
    # Loads answered with it though it was read (or being read) already: a drain swap that loaded it
    # retires it only if no load joined it since the swap's own start, whose caller counts on it too.
    joins: int = 0
    # The engine layout its ranks are placed and served in ("" for the checkpoint's own).
    layout: str = ""
    # Each rank's device as planned: known from registration, while ``ranks`` come only once allocated.
    devices: list[int] = field(default_factory=list)

    def placed_on(self) -> list[int]:
        """Each rank's device, in rank order (as planned, until the ranks are allocated)."""
        if not self.ranks:
            return list(self.devices)
        return [r.device for r in sorted(self.ranks, key=lambda r: r.rank)]

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def resident_bytes(self) -> int:
        return sum(a.size for r in self.ranks for a in r.allocations)

    def held(self, now: float) -> bool:
        return self.hold_until > now or self.relet_until > now

    @property
    def freed(self) -> bool:
        return not self.ranks

    def rank(self, rank: int) -> ResidentRank:
        for r in self.ranks:
            if r.rank == rank:
                return r
        raise InvalidArgument(f"{self.key} has ranks 0..{self.world_size - 1}; rank {rank} does not exist")
