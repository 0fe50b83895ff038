"""Where each tensor of a rank lands inside the rank's resident allocations.

Tensors are packed in source order (file by file, by file offset) at 256-byte alignment, so the
reads of a file walk forward and the writes walk forward with them; a tensor under 256 bytes (a
scalar, a small bias: nothing a kernel reads in vectors) is packed at 16 bytes, a multiple of every
element size, so a header of a million tiny tensors does not reserve 256 bytes for each. A rank
gets one allocation, or several when a backend caps an allocation's size.

An engine layout (``hotweights.format.engine_layout``) changes the order: the parts of a fused tensor
are placed back to back (where the first of them comes in the source order), followed by the zero rows
of its padding, and the rank serves the fused tensor as one entry over them (``served``) in place of its
parts. The fill is unchanged (one segment per file tensor); the padding is zeroed (``zeros``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hotweights.errors import InvalidArgument
from hotweights.format.checkpoint import RankFiles
from hotweights.format.dtypes import served_dtype_name
from hotweights.format.engine_layout import RankRecipe
from hotweights.format.safetensors import TensorEntry
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


@dataclass(frozen=True)
class Zeros:
    """``length`` bytes of an allocation that no file fills and that must read as zero (padding rows)."""

    allocation: int
    offset: int
    length: int


@dataclass
class RankLayout:
    rank: int
    files: list[str]
    allocation_sizes: list[int]
    placements: list[Placement]
    # The files as the checkpoint opened them (headers read through them); the fill reads the same
    # files through them. Empty for a layout not made from an open checkpoint (a restored version).
    sources: list[SourceFile] = field(default_factory=list, repr=False, compare=False)
    # What the rank serves when it is not ``placements`` (an engine layout's fused tensors), and the
    # bytes the fill zeroes.
    served: list[Placement] | None = None
    zeros: list[Zeros] = field(default_factory=list)

    def table(self) -> list[Placement]:
        """The tensors the rank serves, in order."""
        return self.placements if self.served is None else self.served

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


def plan_rank(
    rank: RankFiles, granularity: int, max_allocation: int | None = None, recipe: RankRecipe | None = None
) -> RankLayout:
    """Packs a rank's tensors into allocations of at most ``max_allocation`` bytes (rounded to ``granularity``).

    A tensor larger than ``max_allocation`` gets an allocation of its own; so does a fused tensor, which is
    never split over two. ``recipe``: what an engine layout fuses, pads and leaves out (``rank_recipe``).
    """
    recipe = recipe or RankRecipe()
    fused = recipe.fused
    entries = {t.name: t for h in rank.files for t in h.tensors}
    group_of = {part: g for g in fused for part in g.parts}
    at: dict[str, tuple[int, int]] = {}  # a fused tensor's part -> (allocation, offset), once its block is reserved
    placements: list[Placement] = []
    served: list[Placement] = []
    zeros: list[Zeros] = []
    sizes: list[int] = []
    cursor = 0

    def reserve(nbytes: int) -> tuple[int, int]:
        nonlocal cursor
        offset = round_up(cursor, ALIGN if nbytes >= ALIGN else SMALL_ALIGN)
        if max_allocation and (placements or served) and offset + nbytes > max_allocation and cursor > 0:
            sizes.append(round_up(max(cursor, 1), granularity))
            offset = 0
        cursor = offset + nbytes
        return len(sizes), offset

    for fi, header in enumerate(rank.files):
        for t in sorted(header.tensors, key=lambda t: t.begin):
            if t.name in recipe.dropped:
                continue
            g = group_of.get(t.name)
            if g is None:
                alloc, offset = reserve(t.nbytes)
            else:
                if t.name not in at:  # the first of its parts in the files: reserve the whole block
                    parts = [entries[p] for p in g.parts]
                    row = _row_bytes(parts[-1])
                    total = sum(p.nbytes for p in parts) + g.pad_rows * row
                    alloc, base = reserve(total)
                    offset = base
                    for p in parts:
                        at[p.name] = (alloc, offset)
                        offset += p.nbytes
                    rows = sum(p.shape[0] for p in parts) + g.pad_rows
                    shape = g.shape or (rows, *parts[0].shape[1:])
                    if math.prod(shape) * parts[0].dtype.bits != total * 8:  # a recipe that let a bad shape by
                        raise InvalidArgument(f"{g.name}: {total} bytes cannot be served as {list(shape)}")
                    served.append(_entry(g.name, parts[0], shape, alloc, base, total))
                    if g.pad_rows:
                        zeros.append(Zeros(alloc, base + total - g.pad_rows * row, g.pad_rows * row))
                alloc, offset = at[t.name]
            placement = _entry(t.name, t, t.shape, alloc, offset, t.nbytes, fi)
            placements.append(placement)
            if g is None:
                served.append(placement)
    sizes.append(round_up(max(cursor, 1), granularity))
    sources = [h.source for h in rank.files]
    return RankLayout(
        rank=rank.rank,
        files=[str(h.path) for h in rank.files],
        allocation_sizes=sizes,
        placements=placements,
        sources=[s for s in sources if s is not None] if None not in sources else [],
        served=served if recipe.fused or recipe.dropped else None,
        zeros=zeros,
    )


def _entry(
    name: str, t: TensorEntry, shape: tuple[int, ...], alloc: int, offset: int, nbytes: int, file: int = -1
) -> Placement:
    """A placement of ``nbytes`` with ``t``'s dtype; ``file`` -1 for a served entry no file fills as one."""
    return Placement(
        name=name,
        dtype=t.dtype.name,
        served_dtype=served_dtype_name(t.dtype.name),
        shape=tuple(shape),
        allocation=alloc,
        offset=offset,
        nbytes=nbytes,
        file=file,
        file_offset=t.begin if file >= 0 else 0,
    )


def _row_bytes(t: TensorEntry) -> int:
    """Bytes of one dim-0 row of ``t`` (from its shape, so a rank with no rows of it still has a row size)."""
    n = t.dtype.bits
    for d in t.shape[1:]:
        n *= d
    return n // 8
