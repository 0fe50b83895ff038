"""What a loader is told to do, as one typed value.

The daemon's config builds it; the backends and loaders only read it (no environment below the
config). ``None`` means the default that docs/loader.md gives, with the measurement behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotweights.errors import InvalidArgument
from hotweightsd.loaders.plan import DIRECT_ALIGN

READ_MODES = ("auto", "pread", "odirect")
READ_ORDERS = ("file", "streams")
ENGINES = ("auto", "native", "python")
GDS_MODES = ("auto", "off", "on", "force", "compat")  # force: the same as on
RING_MEMORIES = ("driver", "huge")
# The native engine's limits (hwfill.c's HW_MAX_THREADS and HW_MAX_DEPTH; native.py refuses a library
# built with others). Every engine is held to them, so that engine=auto never makes a ring it refuses.
MAX_THREADS = 1024
MAX_DEPTH = 64


@dataclass(frozen=True)
class LoaderSettings:
    read_mode: str = "auto"  # auto (per range: buffered where resident, O_DIRECT where cold) | pread | odirect
    threads: int | None = None  # readers per rank; None: from the usable cores
    chunk_size: int | None = None  # bytes per read; None: 4 MiB
    ring_depth: int | None = None  # pinned slots per reader; None: 2
    busy_chunk_size: int | None = None  # python workers' read while other fills run; None: 16 MiB
    read_order: str = "file"  # file | streams (each reader through its own contiguous share of the rank)
    engine: str = "auto"  # auto | native | python
    gds: str = "auto"  # auto | off | on (force) | compat
    share_cores: bool = True  # native fills running at once split the cores
    native_lib: str = ""  # the native engine's library; "" = the one built beside the package
    direct_read_size: int | None = None  # bytes per request of an O_DIRECT read (native engine); None: 1 MiB
    direct_chunk_size: int | None = None  # bytes per O_DIRECT read on the native engine; None: 512 KiB
    ring_memory: str = "driver"  # driver (cuMemHostAlloc) | huge (transparent huge pages, then cuMemHostRegister)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("read mode", self.read_mode, READ_MODES),
            ("read order", self.read_order, READ_ORDERS),
            ("loader engine", self.engine, ENGINES),
            ("gds mode", self.gds, GDS_MODES),
            ("ring memory", self.ring_memory, RING_MEMORIES),
        ):
            if value not in allowed:
                raise InvalidArgument(f"unknown {name} {value!r} (choose {', '.join(allowed)})")
        for name, n, most in (
            ("threads", self.threads, MAX_THREADS),
            ("ring depth", self.ring_depth, MAX_DEPTH),
            ("busy chunk size", self.busy_chunk_size, None),
        ):
            if n is not None and n < 1:
                raise InvalidArgument(f"loader {name} must be at least 1, got {n}")
            if n is not None and most is not None and n > most:
                raise InvalidArgument(f"loader {name} must be at most {most} (the native engine's limit), got {n}")
        for name, size in (
            ("chunk size", self.chunk_size),
            ("direct read size", self.direct_read_size),
            ("direct chunk size", self.direct_chunk_size),
        ):
            if size is not None and (size <= 0 or size % DIRECT_ALIGN):
                raise InvalidArgument(f"loader {name} {size} is not a positive multiple of {DIRECT_ALIGN}")
