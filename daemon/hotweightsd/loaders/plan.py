"""A fill's plan: which reads to make and which copies to queue out of each. Pure: no I/O, no CUDA.

A rank's segments are cut by a fixed grid of ``chunk_size`` windows of each file. Each window's
tensors become one read (a ``ReadChunk``: one contiguous file range covering several tensors,
split only where the file has a large hole), and each (chunk ∩ tensor) becomes one ``Piece``: one
host-to-device copy from the chunk's bytes to the tensor's place in its allocation. Pieces
contiguous on both sides merge into one copy. Windows are 4 KiB-aligned, so the O_DIRECT superset
of a chunk never leaves its window nor overlaps another chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from hotweights.errors import InvalidArgument
from hotweightsd.core.layout import Segment

DIRECT_ALIGN = 4096
MAX_GAP = 1024 * 1024  # a hole up to this size inside a window is read through rather than split around


class Piece(NamedTuple):
    """One H2D copy: ``length`` bytes from ``src`` (relative to the chunk's file offset) to (allocation, offset)."""

    src: int
    allocation: int
    offset: int
    length: int


class ReadChunk(NamedTuple):
    """One read: ``length`` bytes of file ``file`` from ``offset``, and the copies out of it; ``direct``:
    read O_DIRECT (the 4 KiB-aligned superset, through the file's O_DIRECT fd), else buffered."""

    file: int
    offset: int
    length: int
    pieces: tuple[Piece, ...]
    direct: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes that reach the device (the read may also cover small holes)."""
        return sum(p.length for p in self.pieces)

    def direct_span(self, align: int = DIRECT_ALIGN) -> tuple[int, int, int]:
        """(aligned start, aligned length, skip): the O_DIRECT read that covers this chunk."""
        start = self.offset // align * align
        end = -(-(self.offset + self.length) // align) * align
        return start, end - start, self.offset - start


def _extend(pieces: list[Piece], piece: Piece) -> None:
    """Appends ``piece``, merged into the last one when both sides are contiguous."""
    last = pieces[-1] if pieces else None
    if (
        last is not None
        and last.allocation == piece.allocation
        and last.src + last.length == piece.src
        and last.offset + last.length == piece.offset
    ):
        pieces[-1] = Piece(last.src, last.allocation, last.offset, last.length + piece.length)
    else:
        pieces.append(piece)


def plan_chunks(segments: Iterable[Segment], chunk_size: int, max_gap: int = MAX_GAP) -> list[ReadChunk]:
    """Cuts segments by a grid of ``chunk_size`` windows per file into reads and copies.

    ``chunk_size`` must be a multiple of 4096 (so windows are O_DIRECT-aligned).
    Chunks come out in file order, file by file.
    """
    if chunk_size <= 0 or chunk_size % DIRECT_ALIGN:
        raise InvalidArgument(f"chunk size {chunk_size} is not a positive multiple of {DIRECT_ALIGN}")
    out: list[ReadChunk] = []
    # The open chunk, in locals (this loop runs once per tensor and window before any byte is read).
    file = window = start = end = -1
    pieces: list[Piece] = []
    for s in sorted(segments, key=lambda s: (s.file, s.file_offset)):
        done = 0
        while done < s.length:
            pos = s.file_offset + done
            w = pos // chunk_size
            n = min(s.length - done, (w + 1) * chunk_size - pos)
            if file != s.file or window != w or pos < end or pos - end > max_gap:
                if pieces:
                    out.append(ReadChunk(file, start, end - start, tuple(pieces)))
                file, window, start, pieces = s.file, w, pos, []
            _extend(pieces, Piece(pos - start, s.allocation, s.offset + done, n))
            end = pos + n
            done += n
    if pieces:
        out.append(ReadChunk(file, start, end - start, tuple(pieces)))
    return out


def run_end(chunks: Sequence[ReadChunk], i: int, chunk_size: int, limit: int, max_gap: int = MAX_GAP) -> int:
    """End (exclusive) of the run of neighbouring chunks from ``i``: one file, one way of reading, in
    order, small gaps, and all inside ``limit`` bytes of grid windows from the first chunk's window (so
    the run's O_DIRECT superset stays inside the run's own windows)."""
    first = chunks[i]
    window = first.offset // chunk_size * chunk_size
    j = i + 1
    while j < len(chunks):
        c, end = chunks[j], chunks[j - 1].offset + chunks[j - 1].length
        if c.file != first.file or c.direct != first.direct or c.offset < end:
            break
        if c.offset - end > max_gap or c.offset + c.length - window > limit:
            break
        j += 1
    return j


def merge_chunks(run: Sequence[ReadChunk]) -> ReadChunk:
    """Neighbouring chunks of one file, read one way (in file order), as one read; copies contiguous on
    both sides merge."""
    first = run[0]
    if len(run) == 1:
        return first
    pieces: list[Piece] = []
    for c in run:
        shift = c.offset - first.offset
        for p in c.pieces:
            _extend(pieces, Piece(p.src + shift, p.allocation, p.offset, p.length))
    end = run[-1].offset + run[-1].length
    return ReadChunk(first.file, first.offset, end - first.offset, tuple(pieces), first.direct)


def check_plan(chunks: Sequence[ReadChunk], allocation_sizes: Sequence[int]) -> None:
    """Every copy lands inside its allocation (a wrong layout must fail before any DMA)."""
    for c in chunks:
        for p in c.pieces:
            if (
                p.allocation >= len(allocation_sizes)
                or p.offset < 0
                or p.offset + p.length > allocation_sizes[p.allocation]
                or p.src + p.length > c.length
            ):
                raise InvalidArgument(
                    f"copy {p} of chunk at file {c.file} offset {c.offset} falls outside "
                    f"its allocation (sizes {list(allocation_sizes)})"
                )


def needed_file_sizes(chunks: Sequence[ReadChunk], nfiles: int) -> list[int]:
    """Per file, the end of its last chunk: a file shorter than that is truncated."""
    ends = [0] * nfiles
    for c in chunks:
        ends[c.file] = max(ends[c.file], c.offset + c.length)
    return ends


def streams(chunks: Sequence[ReadChunk], readers: int) -> list[ReadChunk]:
    """``chunks`` (in file order) cut into ``readers`` contiguous shares of about equal bytes, dealt one
    chunk of each share in turn: readers taking chunks in this order read ``readers`` sequential
    streams at once, each far from the others, so buffered reads of cold data keep the kernel's
    readahead running ahead of every stream (in file order they crowd the one window at the cursor).
    The same reads, the same bytes; only the order changes."""
    if readers <= 1 or len(chunks) <= readers:
        return list(chunks)
    share = max(1, -(-sum(c.length for c in chunks) // readers))
    shares: list[list[ReadChunk]] = [[] for _ in range(readers)]
    done = 0
    for c in chunks:
        shares[min(readers - 1, done // share)].append(c)
        done += c.length
    out: list[ReadChunk] = []
    for k in range(max(len(s) for s in shares)):
        out.extend(s[k] for s in shares if k < len(s))
    return out
