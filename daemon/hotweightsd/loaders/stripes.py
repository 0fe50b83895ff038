"""Lustre striping: where a file's stripes lie, and a read order that keeps many OSTs busy at once.

A Lustre file is cut into ``stripe_size`` pieces dealt round-robin over ``stripe_count`` OSTs (per
component of a composite, PFL layout). A fill's readers take chunks in plan order; in file order, the
reads in flight all fall in the few stripes at the cursor, so with 16 MiB stripes and 4 MiB chunks
twelve readers keep three OSTs busy however many the file is striped over. ``spread`` reorders each
striped file's chunks so that consecutive ones fall in consecutive stripes: the first chunk of each
stripe of a round (one stripe per OST), then the second of each, and so on. Chunks stay on the fill's
grid, so a read stays inside one stripe when the chunk size divides the stripe size and the component
starts on the grid (4 MiB reads in 16 MiB stripes of a plain layout). Only the order changes: the same
reads, the same bytes. Only O_DIRECT reads on the native engine are reordered: buffered reads have the
client's readahead, which a reordered plan would defeat.

The layout comes from the file's ``lustre.lov`` extended attribute (no ``lfs`` binary needed). A file
on another filesystem, or a layout this module does not know, keeps file order.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hotweightsd.loaders import residency
from hotweightsd.loaders.plan import ReadChunk

XATTR = "lustre.lov"
MAGIC_V1 = 0x0BD10BD0
MAGIC_V3 = 0x0BD30BD0  # v1 and a pool name
MAGIC_SPECIFIC = 0x0BD50BD0  # v3 with the OSTs named
MAGIC_COMP_V1 = 0x0BD60BD0  # composite (PFL, FLR): components, each a v1/v3 layout over an extent
_PLAIN = struct.Struct("<II16sIHH")  # magic, pattern, object id, stripe size, stripe count, layout gen
_COMP = struct.Struct("<IIIHHH6s8s")  # magic, size, layout gen, flags, entry count, mirror count, padding
_ENTRY = struct.Struct("<IIQQIII8s4s")  # id, flags, extent start, end, offset, size, layout gen, time, pad
EOF_EXTENT = 2**64 - 1


@dataclass(frozen=True)
class Component:
    """Bytes ``[start, end)`` of the file, striped ``stripe_size`` at a time over ``stripe_count`` OSTs."""

    start: int
    end: int
    stripe_size: int
    stripe_count: int


# A component's stripe count with no OSTs behind it yet (not instantiated, "-c -1" until it is, or data
# on the MDT): nothing to spread over.
UNSET_COUNTS = (0, 0xFFFF)


def _plain(blob: bytes, start: int, end: int) -> Component | None:
    """The component a plain layout describes; None when it is not one."""
    if len(blob) < _PLAIN.size:
        return None
    magic, _, _, size, count, _ = _PLAIN.unpack_from(blob)
    if magic not in (MAGIC_V1, MAGIC_V3, MAGIC_SPECIFIC) or size <= 0:
        return None
    return Component(start, end, size, count)


def _usable(components: list[Component]) -> list[Component] | None:
    kept = [c for c in components if c.stripe_count not in UNSET_COUNTS]
    return kept or None


def parse_lov(blob: bytes) -> list[Component] | None:
    """The components of a ``lustre.lov`` value (plain or composite), in file order; None when it is
    not a layout this module reads (a foreign layout, a truncated value)."""
    if len(blob) < 4:
        return None
    (magic,) = struct.unpack_from("<I", blob)
    if magic != MAGIC_COMP_V1:
        one = _plain(blob, 0, EOF_EXTENT)
        return _usable([one]) if one else None
    if len(blob) < _COMP.size:
        return None
    _, total, _, _, entries, mirrors, _, _ = _COMP.unpack_from(blob)
    if mirrors:  # mirrored (FLR): which copy a read uses is the client's choice
        return None
    out: list[Component] = []
    for i in range(entries):
        at = _COMP.size + i * _ENTRY.size
        if at + _ENTRY.size > len(blob):
            return None
        _, _, start, end, offset, size, _, _, _ = _ENTRY.unpack_from(blob, at)
        one = _plain(blob[offset : offset + size], start, end) if offset + size <= min(total, len(blob)) else None
        if one is None:
            return None
        out.append(one)
    return _usable(sorted(out, key=lambda c: c.start))


def striping(fd: int) -> list[Component] | None:
    """The Lustre layout of the open file ``fd``; None off Lustre or when it cannot be read."""
    try:
        magic, _ = residency.filesystem_of(fd)
        if magic != residency.LUSTRE_MAGIC:
            return None
        return parse_lov(os.getxattr(fd, XATTR))
    except OSError:
        return None


def _key(offset: int, layout: Sequence[Component], chunk_size: int) -> tuple[int, ...]:
    """Where a chunk at ``offset`` goes in the spread order: by component, round of stripes (one per
    OST), place inside its stripe, then stripe."""
    for i, c in enumerate(layout):
        if c.start <= offset < c.end:
            stripe = (offset - c.start) // c.stripe_size
            inside = (offset - c.start) % c.stripe_size // chunk_size
            return (i, stripe // c.stripe_count, inside, stripe)
    return (len(layout), 0, 0, offset)


def worth_spreading(layout: Sequence[Component] | None, chunk_size: int) -> bool:
    """True when file order leaves OSTs idle: several OSTs, and several chunks per stripe."""
    return bool(layout) and any(c.stripe_count > 1 and c.stripe_size > chunk_size for c in layout or ())


def spread(
    chunks: Sequence[ReadChunk], layouts: Sequence[Sequence[Component] | None], chunk_size: int
) -> list[ReadChunk]:
    """``chunks`` (in file order, file by file) with each striped file's chunks reordered so that
    neighbours fall in neighbouring stripes; files keep their order."""
    out: list[ReadChunk] = []
    i = 0
    while i < len(chunks):
        j = i
        while j < len(chunks) and chunks[j].file == chunks[i].file:
            j += 1
        run = chunks[i:j]
        layout = layouts[chunks[i].file] if chunks[i].file < len(layouts) else None
        if layout and worth_spreading(layout, chunk_size):
            run = sorted(run, key=lambda c: _key(c.offset, layout, chunk_size))
        out.extend(run)
        i = j
    return out


def describe(layouts: Sequence[Sequence[Component] | None], chunk_size: int) -> str:
    """One line on the striped files of a fill ("" when there are none)."""
    spread_files = [lay for lay in layouts if lay and worth_spreading(lay, chunk_size)]
    if not spread_files:
        return ""
    widest = max(c.stripe_count for lay in spread_files for c in lay)
    size = max(c.stripe_size for lay in spread_files for c in lay)
    return f"Lustre: {len(spread_files)} striped file(s) read across up to {widest} OSTs ({size >> 20} MiB stripes)"
