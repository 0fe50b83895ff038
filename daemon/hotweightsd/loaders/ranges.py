"""Which byte ranges of a rank's files a fill reads O_DIRECT and which buffered, and the fds for both.

``pread``: every byte buffered. ``odirect``: every byte O_DIRECT (buffered where the filesystem refuses
O_DIRECT, e.g. tmpfs). ``auto``, by page-cache residency (``residency``): a file on a memory filesystem
or (almost) wholly resident is read buffered, one (almost) wholly cold O_DIRECT; a file between the two
is probed page by page and cut on the fill's chunk grid (``residency.split_ranges``), resident ranges
buffered and cold ones O_DIRECT. Runs shorter than ``MIN_RUN_CHUNKS`` chunks take their neighbours'
way, so scattered resident pages do not cut a file into many small alternating ranges. A file read
both ways holds two fds, one opened O_DIRECT. Each chunk of the plan is read the way of its range
(``ReadChunk.direct``); ranges start on the chunk grid, so a chunk never straddles two.
"""

from __future__ import annotations

import bisect
import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from hotweights.errors import BadCheckpoint
from hotweights.format.source import SourceFile
from hotweightsd.loaders import residency
from hotweightsd.loaders.files import open_source
from hotweightsd.loaders.plan import ReadChunk
from hotweightsd.loaders.residency import RangeChoice

# auto: a file whose sampled resident fraction is at least WHOLE_CACHED is read buffered whole, at most
# WHOLE_COLD O_DIRECT whole (no page-by-page probe: the few pages read the other way cost less than it).
WHOLE_CACHED = 0.95
WHOLE_COLD = 0.05
MIN_RUN_CHUNKS = 4


def merge_short(ranges: Sequence[RangeChoice], min_run: int) -> list[RangeChoice]:
    """``ranges`` (alternating ways, in file order) with every run shorter than ``min_run`` flipped to
    its neighbours' way, shortest first, until none is left or one range covers the file."""
    n = len(ranges)
    if n <= 1:
        return list(ranges)
    # A list of the runs linked both ways and a heap of (length, offset, run): a flip joins a run and its
    # neighbours in place, so the whole merge costs O(n log n), where rescanning for the shortest is O(n^2).
    # Equal lengths pop in file order (the offset), as a scan from the start would find them.
    offset = [r.offset for r in ranges]
    length = [r.length for r in ranges]
    direct = [r.direct for r in ranges]
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    alive = [True] * n
    heap = [(length[i], offset[i], i) for i in range(n)]
    heapq.heapify(heap)
    left = n
    while left > 1:
        size, _, i = heapq.heappop(heap)
        if not alive[i] or size != length[i]:
            continue  # joined into another run, or grown since this entry was pushed
        if size >= min_run:
            break
        lo = prev[i] if prev[i] >= 0 else i
        hi = nxt[i] if nxt[i] >= 0 else i
        # lo takes the span from its start to hi's end, the way of i's neighbours
        length[lo] = offset[hi] + length[hi] - offset[lo]
        direct[lo] = not direct[i]
        after = nxt[hi]
        for k in {i, hi} - {lo}:
            alive[k] = False
            left -= 1
        nxt[lo] = after
        if after >= 0:
            prev[after] = lo
        heapq.heappush(heap, (length[lo], offset[lo], lo))
    out = []
    i = 0  # the first run is never joined into another: a flip keeps the leftmost of the runs it joins
    while i >= 0:
        out.append(RangeChoice(offset[i], length[i], direct[i]))
        i = nxt[i]
    return out


def auto_ranges(fd: int, size: int, chunk_size: int) -> tuple[list[RangeChoice], float, bool]:
    """(ranges, resident fraction, on a memory filesystem) of the open file ``fd`` for read mode auto.
    Reads no file data."""
    if size == 0:
        return [], 1.0, False
    fraction, memory = residency.sampled_fraction(fd)
    if memory or fraction >= WHOLE_CACHED:
        return [RangeChoice(0, size, False)], fraction, memory
    if fraction <= WHOLE_COLD:
        return [RangeChoice(0, size, True)], fraction, False
    res = residency.probe(fd)
    ranges = merge_short(residency.split_ranges(res, chunk_size), MIN_RUN_CHUNKS * chunk_size)
    return ranges, res.resident_fraction, False


@dataclass
class FileReads:
    """One file of a fill: its ranges and the fds that read them (-1 where that way is not used)."""

    path: str
    size: int
    ranges: list[RangeChoice]
    buffered_fd: int = -1
    direct_fd: int = -1
    refused: bool = False  # O_DIRECT was wanted and the filesystem refused it: read buffered
    resident: float = 0.0  # auto: the resident fraction the choice was made from
    memory: bool = False  # auto: on a memory filesystem (tmpfs), where buffered reads are copies from memory
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._starts = [r.offset for r in self.ranges]

    @property
    def kind(self) -> str:
        ways = {r.direct for r in self.ranges}
        return "mixed" if len(ways) > 1 else "direct" if ways == {True} else "buffered"

    @property
    def buffered_bytes(self) -> int:
        return sum(r.length for r in self.ranges if not r.direct)

    def direct_at(self, offset: int) -> bool:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and self.ranges[i].direct


def _why(f: FileReads) -> str:
    """Why read mode auto reads ``f`` (read one way) the way it does. "in the page cache" stands for "mostly":
    a file read one way may have had a few pages the other way, too few to be worth a range of their own."""
    if f.kind == "direct":
        return "not in the page cache"
    if f.refused:
        return "O_DIRECT refused"
    return "on a memory filesystem" if f.memory else "in the page cache"


@dataclass
class ReadSources:
    """A fill's files opened the ways their ranges need; ``fds``/``direct`` list every fd opened (the
    native engine's sources, a chunk names one by index). Closed by ``close()``."""

    mode: str
    files: list[FileReads] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    direct: list[bool] = field(default_factory=list)
    _index: dict[int, int] = field(default_factory=dict, repr=False)  # fd -> its index in fds

    @classmethod
    def open(cls, paths: Sequence[SourceFile | str], mode: str, needed: Sequence[int], chunk_size: int) -> ReadSources:
        """Opens ``paths`` (the checkpoint's open files, ``RankLayout.inputs()``, or paths) for read mode
        ``mode``; ``needed``: per file, the size its plan reads up to (a shorter file is a truncated one:
        BadCheckpoint)."""
        sources = cls(mode)
        try:
            for source, need in zip(paths, needed):
                sources.files.append(sources._open_one(source, need, chunk_size))
        except BaseException:
            sources.close()
            raise
        return sources

    def _add(self, fd: int, direct: bool) -> int:
        self._index[fd] = len(self.fds)
        self.fds.append(fd)
        self.direct.append(direct)
        return fd

    def _open_one(self, source: SourceFile | str, need: int, chunk_size: int) -> FileReads:
        path = source if isinstance(source, str) else source.path
        fd, direct = open_source(source, self.mode == "odirect")
        self._add(fd, direct)
        size = os.fstat(fd).st_size
        if size < need:
            raise BadCheckpoint(f"{path}: truncated: {size} bytes, the header promised data up to {need}", path=path)
        whole = [RangeChoice(0, size, direct)] if size else []
        if self.mode != "auto":
            f = FileReads(path, size, whole, refused=self.mode == "odirect" and not direct)
            f.direct_fd, f.buffered_fd = (fd, -1) if direct else (-1, fd)
            return f
        try:
            ranges, resident, memory = auto_ranges(fd, size, chunk_size)
        except OSError as exc:
            raise BadCheckpoint(f"{path}: cannot read its page-cache residency: {exc.strerror}", path=path) from exc
        f = FileReads(path, size, ranges, buffered_fd=fd, resident=resident, memory=memory)
        if f.kind == "buffered":
            return f
        dfd, ok = open_source(source, True)
        if not ok:  # the filesystem refuses O_DIRECT: every range buffered
            os.close(dfd)
            return FileReads(path, size, whole, buffered_fd=fd, refused=True, resident=resident)
        if f.kind == "direct":  # the buffered fd only probed the file
            self.fds.pop()
            self.direct.pop()
            del self._index[fd]
            os.close(fd)
            f.buffered_fd = -1
        f.direct_fd = self._add(dfd, True)
        return f

    def mark(self, chunks: Sequence[ReadChunk]) -> list[ReadChunk]:
        """``chunks`` with ``direct`` set by the range each starts in (the python workers' plan; the
        native engine takes each chunk's way from its fd, ``sources``)."""
        return [c._replace(direct=self.files[c.file].direct_at(c.offset)) for c in chunks]

    def fd(self, chunk: ReadChunk) -> int:
        f = self.files[chunk.file]
        return f.direct_fd if chunk.direct else f.buffered_fd

    def source(self, chunk: ReadChunk) -> int:
        """The index in ``fds`` of the fd that reads ``chunk``."""
        return self._index[self.fd(chunk)]

    def sources(self, chunks: Sequence[ReadChunk]) -> list[int]:
        """The index in ``fds`` of the fd that reads each chunk, by the range it starts in (``mark``
        not needed: the native engine takes the way of a chunk from its fd)."""
        index, files = self._index, self.files
        whole = [  # a file read one way: every chunk of it reads through the same fd
            index[f.direct_fd if f.ranges[0].direct else f.buffered_fd] if len(f.ranges) == 1 else -1 for f in files
        ]
        out = []
        for c in chunks:
            i = whole[c.file]
            if i < 0:
                f = files[c.file]
                i = index[f.direct_fd if f.direct_at(c.offset) else f.buffered_fd]
            out.append(i)
        return out

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    @property
    def refused(self) -> int:
        return sum(1 for f in self.files if f.refused)

    def describe(self) -> str:
        """What the read mode did and why, for the load's description ("" where there is nothing to say):
        ``auto: 2 O_DIRECT, 2 buffered, because 2 not in the page cache, 2 in the page cache``."""
        if self.mode == "odirect":
            n = self.refused
            return f"O_DIRECT refused for {n} file(s) (tmpfs?), read buffered" if n else ""
        if self.mode != "auto":
            return ""
        kinds = [f.kind for f in self.files]
        parts = [f"{kinds.count('direct')} O_DIRECT"] if "direct" in kinds else []
        if "buffered" in kinds:
            parts.append(f"{kinds.count('buffered')} buffered")
        mixed = [f for f in self.files if f.kind == "mixed"]
        if mixed:
            cached = sum(f.buffered_bytes for f in mixed) / max(1, sum(f.size for f in mixed))
            parts.append(f"{len(mixed)} mixed ({cached:.0%} cached)")
        whys = [_why(f) for f in self.files if f.kind != "mixed"]  # a mixed file's share says it already
        counted = [f"{whys.count(w)} {w}" for w in dict.fromkeys(whys)]
        return "auto: " + ", ".join(parts or ["no data"]) + (", because " + ", ".join(counted) if counted else "")

    def close(self) -> None:
        """Closes every fd, even after one fails to close; raises the first failure."""
        fds, self.fds, self._index = self.fds, [], {}
        failed: OSError | None = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
