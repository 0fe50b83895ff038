"""Where a file's bytes are now: in the page cache or on storage, and what its filesystem allows.

The auto read path asks this before each load: ranges already in the page cache are read buffered
(a copy out of memory), ranges that are not go O_DIRECT (no second copy through the cache, and the
disk sees large aligned requests). A file half in cache is read both ways. Nothing here reads file
data: ``mincore`` reports which pages of a mapping are resident without faulting them in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from dataclasses import dataclass
from enum import Enum

PAGE = mmap.PAGESIZE

# statfs(2) f_type values of the filesystems the choice depends on.
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
NFS_MAGIC = 0x6969
LUSTRE_MAGIC = 0x0BD00BD0
FUSE_MAGIC = 0x65735546
OVERLAY_MAGIC = 0x794C7630
FS_NAMES = {
    TMPFS_MAGIC: "tmpfs",
    RAMFS_MAGIC: "ramfs",
    NFS_MAGIC: "nfs",
    LUSTRE_MAGIC: "lustre",
    FUSE_MAGIC: "fuse",
    OVERLAY_MAGIC: "overlayfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
}
MEMORY_FILESYSTEMS = {TMPFS_MAGIC, RAMFS_MAGIC}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.fstatfs.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
# mmap's answers where a file cannot be mapped (a special filesystem): nothing is known to be resident
_NO_MAPPING = (errno.ENODEV, errno.EACCES, errno.EINVAL, errno.ENOMEM)
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore's other bits are reserved


class Residency(str, Enum):
    CACHED = "cached"  # (almost) every page in the page cache
    COLD = "cold"  # (almost) none
    PARTIAL = "partial"
    MEMORY = "memory"  # tmpfs/ramfs: the file is memory


@dataclass(frozen=True)
class FileResidency:
    size: int
    filesystem: str
    fs_magic: int
    pages: bytes  # one byte per page: 1 resident, 0 not ("" for memory filesystems)

    @property
    def memory(self) -> bool:
        return self.fs_magic in MEMORY_FILESYSTEMS

    @property
    def resident_fraction(self) -> float:
        if self.memory or not self.pages:
            return 1.0
        return sum(self.pages) / len(self.pages)

    def resident(self, offset: int, length: int) -> float:
        """The resident fraction of ``[offset, offset + length)``."""
        if self.memory or length <= 0 or not self.pages:
            return 1.0
        lo, hi = offset // PAGE, min(len(self.pages), -(-(offset + length) // PAGE))
        return sum(self.pages[lo:hi]) / max(1, hi - lo)

    def kind(self, low: float = 0.1, high: float = 0.9) -> Residency:
        if self.memory:
            return Residency.MEMORY
        f = self.resident_fraction
        return Residency.CACHED if f >= high else Residency.COLD if f <= low else Residency.PARTIAL


def filesystem_of(fd: int) -> tuple[int, str]:
    """(statfs f_type, a name for it) of the filesystem holding ``fd``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64 and arm64
    if _libc.fstatfs(fd, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    magic = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return magic, FS_NAMES.get(magic, f"0x{magic:x}")


def resident_pages(fd: int, size: int) -> bytes:
    """mincore over a read-only mapping of the whole file: one byte per page, 1 where resident."""
    if size == 0:
        return b""
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        e = ctypes.get_errno()
        raise OSError(e, f"mmap for mincore: {os.strerror(e)}")
    try:
        n = -(-size // PAGE)
        vec = (ctypes.c_ubyte * n)()
        if _libc.mincore(addr, size, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mincore: {os.strerror(e)}")
        return bytes(vec).translate(_LOW_BIT)
    finally:
        _libc.munmap(addr, size)


# A fill asks only "mostly in memory or not": a sample answers that at a fraction of the cost of every
# page, before the first read. The figures behind the sample's size: docs/loader.md (Read mode auto).
SAMPLES = 64
SAMPLE_PAGES = 16


def sampled_fraction(fd: int) -> tuple[float, bool]:
    """(resident fraction of ``SAMPLES`` evenly spread runs of ``SAMPLE_PAGES`` pages, on a memory
    filesystem). Reads no file data."""
    size = os.fstat(fd).st_size
    magic, _ = filesystem_of(fd)
    if magic in MEMORY_FILESYSTEMS:
        return 1.0, True
    pages = -(-size // PAGE)
    if pages <= SAMPLES * SAMPLE_PAGES:
        try:
            got = resident_pages(fd, size)
        except OSError as exc:
            if exc.errno in _NO_MAPPING:
                return 0.0, False
            raise
        return (sum(got) / len(got) if got else 1.0), False
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        return 0.0, False  # no mapping possible (a special filesystem): nothing known to be resident
    try:
        vec = (ctypes.c_ubyte * SAMPLE_PAGES)()
        step = (pages - SAMPLE_PAGES) // (SAMPLES - 1) * PAGE
        span = SAMPLE_PAGES * PAGE
        mincore = _libc.mincore
        resident = 0
        for i in range(SAMPLES):
            if mincore(addr + i * step, span, vec) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"mincore: {os.strerror(e)}")
            resident += bytes(vec).translate(_LOW_BIT).count(1)
        return resident / (SAMPLES * SAMPLE_PAGES), False
    finally:
        _libc.munmap(addr, size)


def probe(fd: int) -> FileResidency:
    """What is resident of the open file ``fd`` now. Reads no file data."""
    size = os.fstat(fd).st_size
    magic, name = filesystem_of(fd)
    if magic in MEMORY_FILESYSTEMS:
        return FileResidency(size, name, magic, b"")
    try:
        pages = resident_pages(fd, size)
    except OSError as exc:
        if exc.errno in _NO_MAPPING:
            # No mapping possible (a special filesystem): say nothing is known to be resident.
            return FileResidency(size, name, magic, bytes(-(-size // PAGE)))
        raise
    return FileResidency(size, name, magic, pages)


@dataclass(frozen=True)
class RangeChoice:
    offset: int
    length: int
    direct: bool


def split_ranges(res: FileResidency, window: int, high: float = 0.5) -> list[RangeChoice]:
    """The file cut into ``window``-sized pieces, each read buffered when at least ``high`` of it is
    resident and O_DIRECT otherwise; neighbours with the same choice merge. ``window`` is a multiple
    of 4096, so every O_DIRECT range stays aligned."""
    out: list[RangeChoice] = []
    for off in range(0, res.size, window):
        n = min(window, res.size - off)
        direct = not res.memory and res.resident(off, n) < high
        last = out[-1] if out else None
        if last is not None and last.direct == direct:
            out[-1] = RangeChoice(last.offset, last.length + n, direct)
        else:
            out.append(RangeChoice(off, n, direct))
    return out
