"""The readers' order of a rank's reads: file by file, or one contiguous stream per reader."""

from __future__ import annotations

import pytest

from hotweightsd.loaders.plan import Piece, ReadChunk, streams

KiB = 1024


def chunks_of(sizes_by_file: list[list[int]]) -> list[ReadChunk]:
    out = []
    for f, sizes in enumerate(sizes_by_file):
        offset = 0
        for n in sizes:
            out.append(ReadChunk(f, offset, n, (Piece(0, 0, 0, n),)))
            offset += n
    return out


def test_each_reader_gets_a_contiguous_share_dealt_in_turn():
    plan = chunks_of([[4 * KiB] * 8, [4 * KiB] * 4])  # 12 chunks of one size over two files
    order = streams(plan, 3)
    assert sorted(order) == sorted(plan) and len(order) == len(plan)
    # shares of 4 chunks: file 0's first and second halves, then all of file 1
    assert [(c.file, c.offset // (4 * KiB)) for c in order[:3]] == [(0, 0), (0, 4), (1, 0)]
    for k in range(3):
        share = order[k::3]
        assert share == sorted(share), "a share is read in file order"
        ends = [(a.file, a.offset + a.length) for a in share[:-1]]
        starts = [(b.file, b.offset) for b in share[1:]]
        assert all(e == s or (sf > ef) for (ef, e), (sf, s) in zip(ends, starts)), "a share has no holes"


def test_shares_are_balanced_by_bytes_not_by_chunks():
    plan = chunks_of([[64 * KiB] + [4 * KiB] * 16])  # one large chunk, then small ones: 128 KiB in all
    order = streams(plan, 2)
    # the large chunk is half the bytes, a share alone: the second stream starts right after it
    assert [(c.offset // KiB, c.length // KiB) for c in order[:3]] == [(0, 64), (64, 4), (68, 4)]
    assert order[1:] == plan[1:] and sorted(order) == sorted(plan)


@pytest.mark.parametrize("readers", [0, 1, 5, 6])
def test_one_reader_or_no_more_chunks_than_readers_keeps_file_order(readers):
    plan = chunks_of([[4 * KiB] * 3, [4 * KiB] * 2])
    assert streams(plan, readers) == plan
