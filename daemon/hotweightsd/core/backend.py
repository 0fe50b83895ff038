"""The MemoryBackend protocol: what the core needs from a kind of memory (host memfd, CUDA VMM).

A backend allocates exportable memory on a device, fills it from a rank's files, exports it as
file descriptors (or legacy IPC handles), and re-adopts descriptors handed back after a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from hotweightsd.core.layout import RankLayout


class HandleType(str, Enum):
    MEMFD = "MEMFD"
    CUDA_VMM_FD = "CUDA_VMM_FD"
    CUDA_IPC = "CUDA_IPC"


class AllocationMode(str, Enum):
    FD = "fd"  # exportable as fds: memfd on cpu, VMM on cuda
    LEGACY_IPC = "legacy_ipc"  # cudaMalloc + cudaIpcMemHandle (cuda only)


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    name: str
    total: int
    free: int


@runtime_checkable
class Allocation(Protocol):
    device: int
    size: int
    handle_type: HandleType
    # The device's PCI bus id ("0000:3b:00.0"), which clients match to their own device numbering;
    # "" for host memory.
    device_bus_id: str

    def export_fd(self) -> int:
        """A new file descriptor for this allocation; the caller owns and closes it."""

    def ipc_handle(self) -> bytes:
        """The legacy IPC handle (CUDA_IPC only)."""

    def close(self) -> None:
        """Releases the daemon's reference. Idempotent."""


ProgressFn = Callable[[int], None]


@runtime_checkable
class MemoryBackend(Protocol):
    name: str
    # Every rank lives on one device (host memory): ranks are not spread over devices.
    shared_device: bool
    # Bytes kept free on every device (host memory for the cpu backend); admission counts without them.
    reserve: int
    # One line on how this backend loads (which read path and why), shown by Status; may be "".
    note: str

    def prepare(self) -> None:
        """Sets up what every load needs (e.g. pinned staging buffers) ahead of the first one.

        The daemon calls it once, in a worker thread, after it is serving; a failure is logged and the
        first load pays for the set-up instead.
        """

    def devices(self) -> list[DeviceMemory]:
        """Every device this backend places ranks on, with live free memory."""

    def granularity(self, device: int) -> int:
        """Allocation sizes are rounded up to this."""

    def max_allocation(self) -> int | None:
        """The largest single allocation to make; None for no cap."""

    def allocate(self, device: int, size: int, mode: AllocationMode) -> Allocation:
        """Raises InsufficientMemory or BackendError; leaves nothing allocated on failure."""

    def concurrent_fills(self, devices: list[int]) -> AbstractContextManager[None]:
        """Wraps the fills of a model's ranks, started together, one per entry of ``devices`` (each rank's
        device): a backend may share host resources among them from the first one's start."""

    def fill(
        self,
        layout: RankLayout,
        allocations: list[Allocation],
        progress: ProgressFn,
        cancel: threading.Event,
    ) -> str:
        """Copies every segment of ``layout`` from its files into ``allocations``.

        Returns a one-line description of the path that ran (e.g. ``"pread x16 threads"``).
        Raises BadCheckpoint if a file is shorter than its header promised, Aborted if cancelled.
        """

    def adopt(self, device: int, size: int, handle_type: HandleType, fd: int) -> Allocation:
        """Wraps an fd handed back by the service manager after a restart; takes ownership of ``fd``."""

    def close(self) -> None:
        """Releases per-device state (contexts, streams, pinned buffers)."""
