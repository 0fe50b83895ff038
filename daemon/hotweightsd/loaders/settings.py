"""What a loader is told to do: the bounce path's and GDS's settings, as one typed value.

The daemon's config builds it; the cuda backend and its loaders only read it (no environment).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderSettings:
    read_mode: str = "auto"  # auto | pread | odirect
    threads: int | None = None  # readers per rank; None: from the usable cores
    chunk_size: int | None = None  # bytes per read; None: the measured default
    ring_depth: int | None = None  # pinned slots per reader
    busy_chunk_size: int | None = None  # read size while other GPUs load
    engine: str = "auto"  # auto | native | python
    gds: str = "auto"  # auto | off | on | compat
    numa: bool = True  # readers and pinned ring on the GPU's NUMA node
    share_cores: bool = True  # ranks loading at once split the cores
    native_lib: str = ""  # the native engine's library; "" = beside the package
