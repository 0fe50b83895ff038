"""Lustre striping: reading a file's layout from its lustre.lov value, and the read order that spreads
a fill's reads in flight over the OSTs (the same reads, in another order)."""

from __future__ import annotations

import os
import struct

import pytest

from hotweightsd.loaders import stripes
from hotweightsd.loaders.plan import Piece, ReadChunk, plan_chunks
from hotweightsd.loaders.stripes import Component

MiB = 1024 * 1024


def plain(stripe_size: int, count: int, magic: int = stripes.MAGIC_V1, pool: bytes = b"") -> bytes:
    """A plain layout as Lustre stores it (little-endian), with one 24-byte OST entry per stripe."""
    head = struct.pack("<II16sIHH", magic, 1, b"\0" * 16, stripe_size, count, 0)
    if magic != stripes.MAGIC_V1:
        head += pool.ljust(16, b"\0")
    return head + b"\0" * 24 * count


def composite(parts: list[tuple[int, int, bytes]], mirrors: int = 0) -> bytes:
    """A composite layout: (extent start, extent end, plain layout) per component."""
    header, entry = 32, 48
    offset = header + entry * len(parts)
    entries, blobs = b"", b""
    for start, end, blob in parts:
        entries += struct.pack(
            "<IIQQIII8s4s", len(entries) // entry + 1, 0x10, start, end, offset, len(blob), 0, b"", b""
        )
        blobs += blob
        offset += len(blob)
    total = header + len(entries) + len(blobs)
    head = struct.pack("<IIIHHH6s8s", stripes.MAGIC_COMP_V1, total, 1, 0, len(parts), mirrors, b"", b"")
    return head + entries + blobs


def test_plain_layouts_v1_and_v3_are_read():
    assert stripes.parse_lov(plain(16 * MiB, 20)) == [Component(0, stripes.EOF_EXTENT, 16 * MiB, 20)]
    v3 = plain(4 * MiB, 8, magic=stripes.MAGIC_V3, pool=b"flash")
    assert stripes.parse_lov(v3) == [Component(0, stripes.EOF_EXTENT, 4 * MiB, 8)]


def test_a_composite_layout_gives_each_extent_its_striping_in_file_order():
    blob = composite([(256 * MiB, stripes.EOF_EXTENT, plain(16 * MiB, 20)), (0, 256 * MiB, plain(MiB, 1))])
    assert stripes.parse_lov(blob) == [
        Component(0, 256 * MiB, MiB, 1),
        Component(256 * MiB, stripes.EOF_EXTENT, 16 * MiB, 20),
    ]


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xd0\x0b",  # shorter than a magic
        plain(16 * MiB, 4)[:20],  # truncated
        struct.pack("<I", 0x0BDA0BD0) + b"\0" * 60,  # a foreign layout
        plain(0, 4),  # no stripe size
        plain(16 * MiB, 0),  # no OSTs behind it (data on the MDT)
        composite([(0, stripes.EOF_EXTENT, plain(16 * MiB, 4))])[:60],  # entries cut off
        composite([(0, stripes.EOF_EXTENT, plain(16 * MiB, 4))], mirrors=1),  # mirrored: the client picks
    ],
    ids=["empty", "short", "truncated", "foreign", "no-size", "no-osts", "cut-entries", "mirrored"],
)
def test_a_layout_this_reader_does_not_know_keeps_file_order(blob):
    assert stripes.parse_lov(blob) is None


def test_components_without_osts_are_left_out_and_the_rest_kept():
    blob = composite(
        [
            (0, MiB, plain(MiB, 0)),
            (MiB, 1024 * MiB, plain(4 * MiB, 4)),
            (1024 * MiB, stripes.EOF_EXTENT, plain(MiB, 0xFFFF)),
        ]
    )
    assert stripes.parse_lov(blob) == [Component(MiB, 1024 * MiB, 4 * MiB, 4)]


def test_a_file_off_lustre_has_no_striping(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 4096)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert stripes.striping(fd) is None
    finally:
        os.close(fd)


def chunks_of(files: list[int], chunk: int) -> list[ReadChunk]:
    return [
        ReadChunk(f, off, chunk, (Piece(0, 0, 0, chunk),))
        for f, size in enumerate(files)
        for off in range(0, size, chunk)
    ]


def test_reads_in_flight_fall_on_as_many_osts_as_the_file_is_striped_over():
    chunk, stripe, osts = 4 * MiB, 16 * MiB, 4
    layout = [Component(0, stripes.EOF_EXTENT, stripe, osts)]
    plan = chunks_of([128 * MiB], chunk)
    spread = stripes.spread(plan, [layout], chunk)
    assert sorted(spread) == sorted(plan)  # the same reads
    # in file order the first 4 reads share one stripe, i.e. one OST; spread, they take one stripe each

    def ost(c: ReadChunk) -> int:
        return c.offset // stripe % osts

    assert {ost(c) for c in plan[:osts]} == {0}
    assert [ost(c) for c in spread[:osts]] == [0, 1, 2, 3]
    assert [c.offset // MiB for c in spread[:6]] == [0, 16, 32, 48, 4, 20]
    # a round of stripes is read before the next: the second round starts after 16 chunks
    assert {c.offset // (stripe * osts) for c in spread[:16]} == {0}


def test_only_striped_files_are_reordered_and_files_keep_their_order():
    chunk = 4 * MiB
    layouts = [None, [Component(0, stripes.EOF_EXTENT, 16 * MiB, 2)], [Component(0, stripes.EOF_EXTENT, 4 * MiB, 8)]]
    plan = chunks_of([32 * MiB, 64 * MiB, 32 * MiB], chunk)
    spread = stripes.spread(plan, layouts, chunk)
    assert [c.file for c in spread] == [c.file for c in plan]
    assert [c for c in spread if c.file == 0] == [c for c in plan if c.file == 0]  # not on Lustre
    assert [c for c in spread if c.file == 2] == [c for c in plan if c.file == 2]  # stripe = chunk: already spread
    assert [c.offset // MiB for c in spread if c.file == 1][:4] == [0, 16, 4, 20]
    assert stripes.describe(layouts, chunk) == "Lustre: 1 striped file(s) read across up to 2 OSTs (16 MiB stripes)"
    assert stripes.describe([None, None], chunk) == ""


def test_components_are_spread_each_by_its_own_striping():
    chunk = MiB
    layout = [Component(0, 8 * MiB, 4 * MiB, 2), Component(8 * MiB, stripes.EOF_EXTENT, 2 * MiB, 4)]
    spread = stripes.spread(chunks_of([16 * MiB], chunk), [layout], chunk)
    assert [c.offset // MiB for c in spread] == [0, 4, 1, 5, 2, 6, 3, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def test_a_plan_spread_over_stripes_still_covers_every_copy_once():
    from hotweightsd.core.layout import Segment

    segs = [Segment(0, off, 3 * MiB, 0, off) for off in range(0, 96 * MiB, 3 * MiB)]
    plan = plan_chunks(segs, 4 * MiB)
    spread = stripes.spread(plan, [[Component(0, stripes.EOF_EXTENT, 16 * MiB, 3)]], 4 * MiB)
    assert sorted(spread) == sorted(plan) and spread != plan
