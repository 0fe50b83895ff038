"""Read mode auto on a file half in the page cache: its resident ranges buffered, its cold ones O_DIRECT."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

from hotweights.testing import fds_under
from hotweightsd.loaders import ranges
from hotweightsd.loaders.plan import Piece, ReadChunk
from hotweightsd.loaders.residency import RangeChoice
from support.pagecache import cache, disk_dir, drop, half_cached, sync

MiB = 1024 * 1024
KiB = 1024


@pytest.fixture
def on_disk():
    d = Path(tempfile.mkdtemp(prefix="hw-ranges-", dir=disk_dir()))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def write(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    sync(path)
    return path


def r(offset: int, length: int, direct: bool) -> RangeChoice:
    return RangeChoice(offset, length, direct)


def test_short_runs_take_their_neighbours_way():
    got = ranges.merge_short([r(0, 10, False), r(10, 2, True), r(12, 10, False), r(22, 30, True)], 5)
    assert got == [r(0, 22, False), r(22, 30, True)]
    # the shortest first; a short run at an end joins its one neighbour; one range is never cut
    assert ranges.merge_short([r(0, 3, True), r(3, 40, False)], 5) == [r(0, 43, False)]
    assert ranges.merge_short([r(0, 3, True)], 5) == [r(0, 3, True)]
    assert ranges.merge_short([r(0, 6, False), r(6, 6, True)], 5) == [r(0, 6, False), r(6, 6, True)]


def merge_by_rescan(ranges_: list[RangeChoice], min_run: int) -> list[RangeChoice]:
    """merge_short as first written: rescan for the shortest run, flip it, repeat (the order to keep)."""
    out = list(ranges_)
    while len(out) > 1:
        i = min(range(len(out)), key=lambda k: out[k].length)
        if out[i].length >= min_run:
            break
        lo, hi = max(0, i - 1), min(len(out) - 1, i + 1)
        end = out[hi].offset + out[hi].length
        out[lo : hi + 1] = [RangeChoice(out[lo].offset, end - out[lo].offset, not out[i].direct)]
    return out


def windows(rng: random.Random, n: int, chunk: int, longest: int) -> list[RangeChoice]:
    """``n`` alternating runs of 1 to ``longest`` chunks, as split_ranges cuts a file; the last one ends
    inside a chunk, as a file does."""
    out, off, direct = [], 0, rng.random() < 0.5
    for k in range(n):
        length = rng.randint(1, longest) * chunk - (chunk // 3 if k == n - 1 else 0)
        out.append(r(off, length, direct))
        off += length
        direct = not direct
    return out


def test_short_runs_merge_in_the_order_a_rescan_would_take():
    rng = random.Random(7)
    for _ in range(400):
        given = windows(rng, rng.randint(1, 40), 8, rng.randint(1, 9))
        min_run = rng.choice([8, 16, 32, 64])
        assert ranges.merge_short(given, min_run) == merge_by_rescan(given, min_run)


class CountedRange(RangeChoice):
    """A range that counts reads of its length and stops a merge that reads them far more than once each."""

    reads = 0
    budget = 2**62

    def __getattribute__(self, name: str):
        if name == "length":
            CountedRange.reads += 1
            if CountedRange.reads > CountedRange.budget:
                raise AssertionError(f"merge_short read run lengths more than {CountedRange.budget} times")
        return super().__getattribute__(name)


@pytest.mark.parametrize("longest", [1, 3, 8])
def test_tens_of_thousands_of_alternating_windows_merge_without_rescanning(longest):
    """A file whose residency alternates window by window (LRU eviction, a cancelled load) is cut into
    about one range per window; merging them must not look at every run again for each flip."""
    chunk, n = 4 * MiB, 40_000
    min_run = ranges.MIN_RUN_CHUNKS * chunk
    plain = windows(random.Random(longest), n, chunk, longest)
    size = plain[-1].offset + plain[-1].length
    given = [CountedRange(w.offset, w.length, w.direct) for w in plain]
    CountedRange.reads, CountedRange.budget = 0, 4 * n
    try:
        got = ranges.merge_short(given, min_run)
    finally:
        CountedRange.budget = 2**62
    assert got[0].offset == 0 and got[-1].offset + got[-1].length == size
    for a, b in zip(got, got[1:]):
        assert a.offset + a.length == b.offset and a.direct != b.direct
    assert all(g.offset % chunk == 0 for g in got)
    assert len(got) == 1 or all(g.length >= min_run for g in got)


def test_a_half_cached_file_is_opened_both_ways_and_its_chunks_follow_their_ranges(on_disk):
    chunk = 64 * KiB
    mixed = write(on_disk / "mixed.bin", 2 * MiB)
    cut = half_cached(mixed, chunk)
    cold = write(on_disk / "cold.bin", 1 * MiB)
    drop(cold)
    warm = write(on_disk / "warm.bin", 1 * MiB)
    cache(warm)
    paths = [str(mixed), str(cold), str(warm)]
    sources = ranges.ReadSources.open(paths, "auto", [2 * MiB, MiB, MiB], chunk)
    try:
        m, c, w = sources.files
        assert [f.kind for f in sources.files] == ["mixed", "direct", "buffered"]
        assert m.ranges == [r(0, cut, False), r(cut, 2 * MiB - cut, True)]
        assert m.buffered_fd >= 0 and m.direct_fd >= 0 and c.buffered_fd == -1 and w.direct_fd == -1
        assert len(sources.fds) == 4 and sum(sources.direct) == 2  # this filesystem takes O_DIRECT
        assert sources.describe() == (
            "auto: 1 O_DIRECT, 1 buffered, 1 mixed (50% cached), because 1 not in the page cache, 1 in the page cache"
        )
        chunks = [ReadChunk(0, off, chunk, (Piece(0, 0, 0, chunk),)) for off in range(0, 2 * MiB, chunk)]
        marked = sources.mark(chunks)
        assert [c.direct for c in marked] == [c.offset >= cut for c in chunks]
        assert {sources.direct[sources.source(c)] for c in marked[: cut // chunk]} == {False}
        assert {sources.direct[sources.source(c)] for c in marked[cut // chunk :]} == {True}
        # the native engine's sources come from the ranges, unmarked, and agree with the marked chunks
        every = chunks + [ReadChunk(f, off, chunk, (Piece(0, 0, 0, chunk),)) for f in (1, 2) for off in (0, chunk)]
        assert sources.sources(every) == [sources.source(c) for c in sources.mark(every)]
        assert [sources.direct[i] for i in sources.sources(every)][-4:] == [True, True, False, False]
    finally:
        sources.close()
    assert sources.fds == []


def test_fixed_modes_read_every_file_one_way(on_disk):
    p = write(on_disk / "f.bin", 1 * MiB)
    half_cached(p, 64 * KiB)
    for mode, direct in (("pread", False), ("odirect", True)):
        sources = ranges.ReadSources.open([str(p)], mode, [MiB], 64 * KiB)
        try:
            assert sources.files[0].ranges == [r(0, MiB, direct)] and sources.direct == [direct]
            assert sources.describe() == ""
        finally:
            sources.close()


def test_scattered_resident_pages_do_not_cut_a_file_into_pieces(on_disk):
    chunk = 64 * KiB
    p = write(on_disk / "scattered.bin", 4 * MiB)
    drop(p)
    for off in range(0, 4 * MiB, 512 * KiB):  # one resident chunk in eight
        cache(p, off, chunk)
        drop(p, off + chunk, 512 * KiB - chunk)
    sources = ranges.ReadSources.open([str(p)], "auto", [4 * MiB], chunk)
    try:
        assert sources.files[0].ranges == [r(0, 4 * MiB, True)], sources.files[0].ranges
    finally:
        sources.close()


def test_a_file_shorter_than_its_plan_is_truncated_and_nothing_stays_open(on_disk):
    from hotweights.errors import BadCheckpoint

    ok = write(on_disk / "ok.bin", 1 * MiB)
    short = write(on_disk / "short.bin", 1 * MiB)

    before = fds_under(on_disk)
    for mode in ("auto", "pread", "odirect"):
        with pytest.raises(BadCheckpoint, match="truncated"):
            ranges.ReadSources.open([str(ok), str(short)], mode, [MiB, MiB + 1], 64 * KiB)
    assert fds_under(on_disk) == before


def test_a_memory_filesystem_is_read_buffered_by_auto_and_odirect_says_where_refused():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    p = Path(tempfile.mkstemp(dir="/dev/shm", prefix="hw-ranges-")[1])
    try:
        p.write_bytes(os.urandom(MiB))
        auto = ranges.ReadSources.open([str(p)], "auto", [MiB], 64 * KiB)
        try:
            assert auto.files[0].ranges == [r(0, MiB, False)]
            assert auto.describe() == "auto: 1 buffered, because 1 on a memory filesystem"
        finally:
            auto.close()
        odirect = ranges.ReadSources.open([str(p)], "odirect", [MiB], 64 * KiB)
        try:
            if odirect.direct == [True]:  # tmpfs takes O_DIRECT from Linux 6.6 on
                assert odirect.files[0].ranges == [r(0, MiB, True)] and odirect.describe() == ""
            else:
                assert odirect.files[0].refused and odirect.files[0].ranges == [r(0, MiB, False)]
                assert odirect.describe() == "O_DIRECT refused for 1 file(s) (tmpfs?), read buffered"
        finally:
            odirect.close()
    finally:
        p.unlink()


def test_auto_reads_a_cold_file_buffered_where_its_filesystem_refuses_o_direct(on_disk, monkeypatch):
    real = ranges.open_source
    monkeypatch.setattr(ranges, "open_source", lambda path, direct: real(path, False))  # as tmpfs before Linux 6.6
    p = write(on_disk / "cold.bin", 1 * MiB)
    drop(p)
    sources = ranges.ReadSources.open([str(p)], "auto", [MiB], 64 * KiB)
    try:
        f = sources.files[0]
        assert f.refused and f.ranges == [r(0, MiB, False)] and f.direct_fd == -1
        assert sources.fds == [f.buffered_fd] and sources.describe() == "auto: 1 buffered, because 1 O_DIRECT refused"
    finally:
        sources.close()


def test_close_closes_every_fd_even_when_one_fails_to_close(on_disk, monkeypatch):
    paths = [str(write(on_disk / f"f{i}.bin", 64 * KiB)) for i in range(3)]
    sources = ranges.ReadSources.open(paths, "pread", [64 * KiB] * 3, 64 * KiB)
    first, *rest = sources.fds
    real = os.close

    def close(fd: int) -> None:
        if fd == first:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError, match="Input/output error"):
        sources.close()
    monkeypatch.undo()
    for fd in rest:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert sources.fds == []
    os.close(first)
