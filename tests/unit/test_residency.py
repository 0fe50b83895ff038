"""The residency probe behind the auto read path: what is in the page cache, without reading it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from hotweightsd.loaders import residency
from hotweightsd.loaders.residency import PAGE, Residency
from support.pagecache import disk_dir, drop

MiB = 1024 * 1024


def write(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())  # clean pages: DONTNEED may drop them
    return path


def probe(path: Path) -> residency.FileResidency:
    fd = os.open(path, os.O_RDONLY)
    try:
        return residency.probe(fd)
    finally:
        os.close(fd)


@pytest.fixture
def on_disk():
    d = Path(tempfile.mkdtemp(prefix="hw-res-", dir=disk_dir()))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def test_a_freshly_written_file_is_cached(on_disk):
    res = probe(write(on_disk / "fresh.bin", 8 * MiB))
    assert res.kind() is Residency.CACHED
    assert res.resident_fraction > 0.9


def test_a_dropped_file_is_cold(on_disk):
    p = write(on_disk / "cold.bin", 8 * MiB)
    drop(p)
    res = probe(p)
    assert res.kind() is Residency.COLD, res.resident_fraction


def test_a_half_dropped_file_is_partial_and_splits_both_ways(on_disk):
    p = write(on_disk / "half.bin", 8 * MiB)
    drop(p, 4 * MiB, 4 * MiB)
    res = probe(p)
    assert res.kind() is Residency.PARTIAL
    ranges = residency.split_ranges(res, 1 * MiB)
    assert [(r.offset, r.length, r.direct) for r in ranges] == [(0, 4 * MiB, False), (4 * MiB, 4 * MiB, True)]


def test_a_file_in_tmpfs_is_memory_and_always_buffered():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    p = Path(tempfile.mkstemp(dir="/dev/shm", prefix="hw-res-")[1])
    try:
        write(p, 2 * MiB)
        drop(p)  # tmpfs pages are the file: nothing to drop
        res = probe(p)
        assert res.filesystem == "tmpfs" and res.kind() is Residency.MEMORY
        assert all(not r.direct for r in residency.split_ranges(res, 1 * MiB))
    finally:
        p.unlink()


def test_probing_reads_no_data(on_disk):
    p = write(on_disk / "untouched.bin", 4 * MiB)
    drop(p)
    probe(p)
    assert probe(p).kind() is Residency.COLD  # mincore did not fault pages in


def test_ranges_are_window_aligned_and_cover_the_file():
    pages = bytes([1] * 10 + [0] * 30 + [1] * 3)
    res = residency.FileResidency(size=43 * PAGE - 100, filesystem="ext4", fs_magic=0xEF53, pages=pages)
    ranges = residency.split_ranges(res, 8 * PAGE)
    assert sum(r.length for r in ranges) == res.size
    assert all(r.offset % (8 * PAGE) == 0 for r in ranges)
    assert [(r.offset // PAGE, r.direct) for r in ranges] == [(0, False), (8, True), (40, False)]


def test_empty_file():
    res = residency.FileResidency(size=0, filesystem="ext4", fs_magic=0xEF53, pages=b"")
    assert residency.split_ranges(res, PAGE) == [] and res.resident_fraction == 1.0


def test_the_sampled_fraction_agrees_with_every_page(on_disk):
    p = write(on_disk / "big.bin", 64 * MiB)  # more pages than the sample covers
    fd = os.open(p, os.O_RDONLY)
    try:
        assert residency.sampled_fraction(fd) == (1.0, False)
        drop(p, 0, 48 * MiB)
        fraction, memory = residency.sampled_fraction(fd)
        full = residency.probe(fd).resident_fraction
        assert not memory and abs(fraction - full) < 0.05 and 0.2 < full < 0.3, (fraction, full)
        drop(p)
        assert residency.sampled_fraction(fd)[0] < 0.05
    finally:
        os.close(fd)
