"""Files half in the page cache, on a filesystem where pages can be dropped (not tmpfs, not overlayfs)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from hotweightsd.loaders import residency


def disk_dir(*candidates: Path) -> Path:
    """The first of ``candidates`` (then the temp dir, home, cwd) on a block device's filesystem, or skip."""
    for d in (*candidates, Path(tempfile.gettempdir()), Path.home(), Path.cwd()):
        fd = os.open(d, os.O_RDONLY)
        try:
            magic, _ = residency.filesystem_of(fd)
        finally:
            os.close(fd)
        if magic not in residency.MEMORY_FILESYSTEMS and magic != residency.OVERLAY_MAGIC:
            return d
    pytest.skip("no block-device filesystem to drop pages from on this machine")


def sync(path: Path) -> None:
    """Writes the file's dirty pages back (only clean pages can be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop(path: Path, offset: int = 0, length: int = 0) -> None:
    """POSIX_FADV_DONTNEED over ``[offset, offset + length)`` (length 0: to the end)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache(path: Path, offset: int = 0, length: int | None = None) -> None:
    """Reads ``[offset, offset + length)`` (None: to the end) into the page cache."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past the range, now or later
        f.seek(offset)
        left = os.fstat(f.fileno()).st_size - offset if length is None else length
        while left > 0 and (got := f.read(min(left, 1 << 20))):
            left -= len(got)


def half_cached(path: Path, align: int) -> int:
    """Leaves the first half of ``path`` (up to a multiple of ``align``) in the page cache and the rest
    out of it; returns where the cold half starts. Skips where the pages did not go."""
    sync(path)
    size = path.stat().st_size
    cut = size // 2 // align * align
    drop(path)
    cache(path, 0, cut)
    drop(path, cut)  # what readahead brought in past the cut
    fd = os.open(path, os.O_RDONLY)
    try:
        res = residency.probe(fd)
    finally:
        os.close(fd)
    if res.resident(0, cut) < 0.9 or res.resident(cut, size - cut) > 0.1:
        pytest.skip(f"the page cache did not drop or keep pages as asked here ({res.filesystem})")
    return cut
