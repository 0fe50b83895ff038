"""Where each tensor of a rank lands inside the rank's resident allocations.

Tensors are packed in source order (file by file, by file offset) at 256-byte alignment, so the
reads of a file walk forward and the writes walk forward with them; a tensor under 256 bytes (a
scalar, a small bias: nothing a kernel reads in vectors) is packed at 16 bytes, a multiple of every
element size, so a header of a million tiny tensors does not reserve 256 bytes for each. A rank
gets one allocation, or several when a backend caps an allocation's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hotweights.format.checkpoint import RankFiles
from hotweights.format.dtypes import served_dtype_name
from hotweights.format.source import SourceFile

ALIGN = 256
SMALL_ALIGN = 16  # for tensors under ALIGN bytes


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Placement:
    name: str
    dtype: str  # safetensors dtype
    served_dtype: str  # torch dtype name the client builds
    shape: tuple[int, ...]
    allocation: int
    offset: int
    nbytes: int
    file: int  # index into RankLayout.files
    file_offset: int

    @property
    def strides(self) -> tuple[int, ...]:
        if self.served_dtype == "uint8" and self.dtype not in ("U8",):
            return (1,) if self.shape else ()
        out, acc = [], 1
        for d in reversed(self.shape):
            out.append(acc)
            acc *= max(d, 1)
        return tuple(reversed(out))


@dataclass(frozen=True)
class Segment:
    """One contiguous copy: ``length`` bytes of a file into an allocation."""

    file: int
    file_offset: int
    length: int
    allocation: int
    offset: int


@dataclass
class RankLayout:
    rank: int
    files: list[str]
    allocation_sizes: list[int]
    placements: list[Placement]
    # The files as the checkpoint opened them (headers read through them); the fill reads the same
    # files through them. Empty for a layout not made from an open checkpoint (a restored version).
    sources: list[SourceFile] = field(default_factory=list, repr=False, compare=False)

    def inputs(self) -> list[SourceFile | str]:
        """The files as the fill opens them: the checkpoint's open files, else their paths."""
        return list(self.sources) if self.sources else list(self.files)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.placements)

    @property
    def reserved_bytes(self) -> int:
        return sum(self.allocation_sizes)

    def segments(self) -> list[Segment]:
        return [Segment(p.file, p.file_offset, p.nbytes, p.allocation, p.offset) for p in self.placements if p.nbytes]


def plan_rank(rank: RankFiles, granularity: int, max_allocation: int | None = None) -> RankLayout:
    """Packs a rank's tensors into allocations of at most ``max_allocation`` bytes (rounded to ``granularity``).

    A tensor larger than ``max_allocation`` gets an allocation of its own.
    """
    placements: list[Placement] = []
    sizes: list[int] = []
    cursor = 0
    for fi, header in enumerate(rank.files):
        for t in sorted(header.tensors, key=lambda t: t.begin):
            offset = round_up(cursor, ALIGN if t.nbytes >= ALIGN else SMALL_ALIGN)
            if max_allocation and placements and offset + t.nbytes > max_allocation and cursor > 0:
                sizes.append(round_up(max(cursor, 1), granularity))
                offset = 0
            alloc = len(sizes)
            placements.append(
                Placement(
                    name=t.name,
                    dtype=t.dtype.name,
                    served_dtype=served_dtype_name(t.dtype.name),
                    shape=t.shape,
                    allocation=alloc,
                    offset=offset,
                    nbytes=t.nbytes,
                    file=fi,
                    file_offset=t.begin,
                )
            )
            cursor = offset + t.nbytes
    sizes.append(round_up(max(cursor, 1), granularity))
    sources = [h.source for h in rank.files]
    return RankLayout(
        rank=rank.rank,
        files=[str(h.path) for h in rank.files],
        allocation_sizes=sizes,
        placements=placements,
        sources=[s for s in sources if s is not None] if None not in sources else [],
    )
