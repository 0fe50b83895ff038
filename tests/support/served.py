"""What a manager serves for a rank, read as a client reads it: through a lease, a ticket redeemed for
the allocations' fds, and a mapping of each; for in-process tests of the cpu backend."""

from __future__ import annotations

import mmap
import os


def served_bytes(m, ref: str, rank: int = 0) -> dict[str, tuple]:
    """Name -> (table entry, its bytes) of every tensor rank ``rank`` of ``ref`` serves."""
    lease = m.open_lease(ref, pid=os.getpid())
    try:
        h = m.get_handles(lease.id, rank, lease.key)
        _, fds = m.redeem(h.ticket, os.getpid(), os.getuid())
        out = {}
        try:
            for p in h.rank.layout.table():
                size = h.rank.allocations[p.allocation].size
                with mmap.mmap(fds[p.allocation], size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                    out[p.name] = (p, bytearray(mm[p.offset : p.offset + p.nbytes]))
        finally:
            for fd in fds:
                os.close(fd)
        return out
    finally:
        m.close_lease(lease.id)
