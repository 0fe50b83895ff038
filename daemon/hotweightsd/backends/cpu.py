"""Host shared memory through memfd: the backend for CPU serving and for every CI lifecycle test.

Each allocation is a sealed memfd once loaded (no grow, shrink or write), so clients map exactly
what was loaded and nobody, the daemon included, can change it under them.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from hotweights.errors import BackendError, InsufficientMemory, InvalidArgument
from hotweightsd.core.backend import AllocationMode, DeviceMemory, HandleType, ProgressFn
from hotweightsd.core.layout import RankLayout
from hotweightsd.loaders.files import parallel_read

log = logging.getLogger("hotweightsd.cpu")

PAGE = mmap.PAGESIZE
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    return _meminfo("MemAvailable")


def mem_total() -> int:
    return _meminfo("MemTotal")


class MemfdAllocation:
    handle_type = HandleType.MEMFD
    device_bus_id = ""  # host memory: no GPU to name

    def __init__(
        self, size: int, fd: int | None = None, name: str = "hotweights", on_close: Callable[[int], None] | None = None
    ) -> None:
        self.device = 0
        self._on_close = on_close
        self.size = size
        if fd is None:
            try:
                fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, size)
            except OSError as exc:
                if fd is not None:
                    os.close(fd)
                raise BackendError(
                    "memfd_create", exc.errno or "os", f"memfd_create/ftruncate of {size} bytes: {exc}"
                ) from exc
        self.fd: int | None = fd
        self._fd_open: int = fd
        self._map: mmap.mmap | None = None

    def writable(self) -> mmap.mmap:
        if self._map is None:
            self._map = mmap.mmap(self._fd_open, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return self._map

    def seal(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        fcntl.fcntl(self._fd_open, fcntl.F_ADD_SEALS, _SEALS)

    def export_fd(self) -> int:
        # A read-only open of the memfd: the receiver cannot map it writable even before the seal.
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def ipc_handle(self) -> bytes:
        raise InvalidArgument("memfd allocations have no CUDA IPC handle")

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A view of the mapping is still alive: the pages (and the mapping's own fd) stay until
                # it is collected, while the count below says they are free. A bug in whoever kept it.
                log.error("memfd of %d bytes closed while a view of its mapping is alive (leaked)", self.size)
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self._on_close is not None:
                self._on_close(self.size)


class CpuBackend:
    name = "cpu"
    shared_device = True

    def __init__(self, memory_limit: int | None = None, reserve: int = 0, threads: int | None = None) -> None:
        self.memory_limit = memory_limit
        self.reserve = reserve
        self.threads = threads or min(16, (os.cpu_count() or 2) * 2)
        self.note = f"cpu: pread into memfd, {self.threads} threads"
        self._resident = 0
        self._lock = threading.Lock()

    def prepare(self) -> None:
        pass  # nothing to set up ahead of the first load

    def devices(self) -> list[DeviceMemory]:
        avail = max(0, mem_available() - self.reserve)
        if self.memory_limit is not None:
            avail = min(avail, max(0, self.memory_limit - self._resident))
        # The host's memory, or the cap: "free of" a figure that moves with the page cache says nothing.
        total = self.memory_limit if self.memory_limit is not None else mem_total()
        return [DeviceMemory(0, "host", total, avail)]

    def granularity(self, device: int) -> int:
        return PAGE

    def max_allocation(self) -> int | None:
        return None

    def allocate(self, device: int, size: int, mode: AllocationMode) -> MemfdAllocation:
        if mode is not AllocationMode.FD:
            raise InvalidArgument(
                "the cpu backend only makes fd-exportable (memfd) allocations; legacy CUDA IPC needs --backend cuda"
            )
        free = self.devices()[0].free
        if size > free:
            raise InsufficientMemory(f"host memory: need {size} bytes, {free} free", needed=size, free=free)
        alloc = MemfdAllocation(size, on_close=self._released)
        self._account(size)
        return alloc

    def _account(self, size: int) -> None:
        with self._lock:
            self._resident += size

    def _released(self, size: int) -> None:
        self._account(-size)

    def concurrent_fills(self, devices: list[int]) -> AbstractContextManager[None]:
        return nullcontext()  # one pool of readers per fill; the cpu backend does not tune for co-runners

    def fill(self, layout: RankLayout, allocations: list, progress: ProgressFn, cancel: threading.Event) -> str:
        maps: list[memoryview] = []
        try:
            for a in allocations:  # a loop, not a comprehension: a failure releases the views made before it
                maps.append(memoryview(a.writable()))
            parallel_read(
                layout, lambda s: maps[s.allocation][s.offset : s.offset + s.length], self.threads, progress, cancel
            )
            for z in layout.zeros:  # a fresh memfd reads as zero already; said here so it holds for any allocator
                maps[z.allocation][z.offset : z.offset + z.length] = bytes(z.length)
        finally:
            for m in maps:
                m.release()
        for a in allocations:
            a.seal()
        return self.note

    def adopt(self, device: int, size: int, handle_type: HandleType, fd: int) -> MemfdAllocation:
        if handle_type is not HandleType.MEMFD:
            os.close(fd)
            raise InvalidArgument(f"the cpu backend cannot adopt a {handle_type.value} handle")
        actual = os.fstat(fd).st_size
        if actual != size:
            os.close(fd)
            raise BackendError("adopt", "size", f"stored fd is {actual} bytes, state says {size}")
        alloc = MemfdAllocation(size, fd=fd, on_close=self._released)
        self._account(size)
        return alloc

    def close(self) -> None:
        pass
