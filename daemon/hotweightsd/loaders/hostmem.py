"""Host memory in transparent huge pages, and how much of it the kernel really backs with them.

An O_DIRECT read lands straight in the memory it is given; the block layer describes that memory to the
disk a physically contiguous run at a time, so memory of 2 MiB pages takes a few segments a request
where memory of scattered 4 KiB pages takes one per page. ``MADV_HUGEPAGE`` asks for huge pages; whether
the kernel gave them (THP off, memory fragmented) is read back from ``/proc/self/smaps``.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable
from typing import Any

from hotweights.cuda import devices as cd

HUGE = 2 * 1024 * 1024


class HugePages:
    """``nbytes`` of private anonymous memory from a 2 MiB boundary, advised huge and, with ``touch``, faulted
    in (the calling thread's first touch places it on its NUMA node)."""

    def __init__(self, nbytes: int, touch: bool = True) -> None:
        if nbytes <= 0:
            raise ValueError(f"huge-page memory of {nbytes} bytes")
        self.nbytes = nbytes
        self._map: mmap.mmap | None = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # the anchor is the only export of the mapping's buffer: dropped before close() can unmap it
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._map)
        self.ptr = -(-ctypes.addressof(self._anchor) // HUGE) * HUGE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP not built into this kernel: 4 KiB pages still work
                pass
        if touch:
            ctypes.memset(self.ptr, 0, nbytes)

    def huge_share(self) -> float | None:
        return huge_share([(self.ptr, self.ptr + self.nbytes)])

    def close(self) -> None:
        self._anchor = None
        if self._map is not None:
            self._map.close()
            self._map = None
        self.ptr = 0


def registered(drv: Any, nbytes: int, touch: bool = True) -> HugePages:
    """``HugePages`` registered with the driver (portable: every context may copy from them), or unmapped
    again when the driver refuses them. The caller unregisters them (``cuMemHostUnregister``) before
    ``close()``."""
    huge = HugePages(nbytes, touch)
    try:
        flags = int(drv.CU_MEMHOSTREGISTER_PORTABLE)
        cd.check(drv.cuMemHostRegister(huge.ptr, nbytes, flags), "cuMemHostRegister", bytes=nbytes)
    except BaseException:
        huge.close()
        raise
    return huge


def huge_share(spans: Iterable[tuple[int, int]], smaps: str = "/proc/self/smaps") -> float | None:
    """The share of the mappings overlapping ``spans`` ([start, end) addresses) backed by huge pages
    (``AnonHugePages``); None where no mapping overlaps them or smaps cannot be read."""
    spans = list(spans)
    huge = total = 0
    current = None
    try:
        with open(smaps) as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5:
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    current = (lo, hi) if any(lo < b and a < hi for a, b in spans) else None
                elif current and head[0] == "AnonHugePages:":
                    huge += int(head[1]) * 1024
                    total += current[1] - current[0]
    except (OSError, ValueError):
        return None
    return round(huge / total, 3) if total else None
