"""The cuda backend: resident weights in CUDA VMM allocations, handed out as POSIX fds.

One primary context per GPU (the one torch uses), retained for the life of the daemon.

- ``AllocationMode.FD`` (default): ``cuMemCreate`` with POSIX-fd handles, size rounded to the VMM
  granularity (2 MiB), mapped read-write in the daemon so the loader can fill it. The allocation is
  exported once (``cuMemExportToShareableHandle``) and ``export_fd()`` hands out duplicates of that
  fd; clients import, map and build tensors (``hotweights.cuda.driver``). The physical memory lives
  while any process holds an fd, an import or a mapping of it: it outlives the daemon, so a daemon
  restart can ``adopt()`` fds handed back by systemd.
- ``AllocationMode.LEGACY_IPC``: ``cuMemAlloc`` + ``cuIpcGetMemHandle``, a 64-byte handle that
  travels in protobuf, for clients that cannot receive fds. Limits: the memory belongs to the daemon's
  context and dies with the daemon (clients' mappings included); it cannot be adopted after a restart;
  a process cannot open its own handle.

Admission: an allocation that does not fit in the device's free memory (``cuMemGetInfo``) minus
``reserve`` (and within ``memory_limit`` per device, when set) raises InsufficientMemory before anything
is allocated or read.

Loading: the load path (GDS or the bounce ring, the engine, the ring's shape) is chosen once, at
start (``loaders.path.choose``), and ``note`` says which and why. Fills of different devices run in
parallel (each device has its own ring) under one ``FillScheduler``; fills of one device take turns
on its ring.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from hotweights.cuda import devices as cd
from hotweights.errors import BackendError, CudaError, InsufficientMemory, InvalidArgument
from hotweightsd.core.backend import AllocationMode, DeviceMemory, HandleType, ProgressFn
from hotweightsd.core.layout import RankLayout
from hotweightsd.loaders import bounce, gds
from hotweightsd.loaders.path import LoadPath, choose
from hotweightsd.loaders.ring import DeviceRing
from hotweightsd.loaders.scheduler import FillScheduler
from hotweightsd.loaders.settings import LoaderSettings

log = logging.getLogger("hotweightsd.cuda")


class _CudaAllocation:
    handle_type: HandleType

    def __init__(self, device: int, size: int, address: int, bus_id: str, on_close: Callable[[int, int], None]) -> None:
        self.device = device
        self.device_bus_id = bus_id  # the GPU as every process names it, whatever its CUDA_VISIBLE_DEVICES
        self.size = size
        self.address = address
        self._on_close = on_close
        self._lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        """Releases the daemon's reference (idempotent). Raises CudaError if the driver refused a step."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        errors = self._release()
        self._on_close(self.device, self.size)
        for e in errors[1:]:
            log.error("closing a %s allocation on cuda:%d: %s", self.handle_type.value, self.device, e)
        if errors:
            raise errors[0]

    def _release(self) -> list[Exception]:
        raise NotImplementedError


class VmmAllocation(_CudaAllocation):
    """A ``cuMemCreate`` allocation, mapped in the daemon, exported once as a kept fd."""

    handle_type = HandleType.CUDA_VMM_FD

    def __init__(
        self,
        device: int,
        size: int,
        handle: Any,
        fd: int,
        address: int,
        bus_id: str,
        on_close: Callable[[int, int], None],
    ) -> None:
        super().__init__(device, size, address, bus_id, on_close)
        self._handle = handle
        self._fd: int | None = fd

    def export_fd(self) -> int:
        if self._fd is None:
            raise InvalidArgument("this allocation is closed")
        return fcntl.fcntl(self._fd, fcntl.F_DUPFD_CLOEXEC, 0)

    def ipc_handle(self) -> bytes:
        raise InvalidArgument("a VMM allocation has no legacy CUDA IPC handle (load the model with legacy IPC mode)")

    def _release(self) -> list[Exception]:
        errors: list[Exception] = []
        try:
            with cd.current(self.device) as drv:
                errors += cd.unmap(self.address, self.size)
                try:
                    cd.check(drv.cuMemRelease(self._handle), "cuMemRelease", device=self.device)
                except CudaError as exc:
                    errors.append(exc)
        except Exception as exc:
            errors.append(exc)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return errors


class IpcAllocation(_CudaAllocation):
    """A ``cuMemAlloc`` allocation with a legacy IPC handle. Dies with the daemon; cannot be adopted."""

    handle_type = HandleType.CUDA_IPC

    def __init__(
        self, device: int, size: int, address: int, handle: bytes, bus_id: str, on_close: Callable[[int, int], None]
    ) -> None:
        super().__init__(device, size, address, bus_id, on_close)
        self._ipc = handle

    def export_fd(self) -> int:
        raise InvalidArgument("a legacy CUDA IPC allocation has no file descriptor; clients open its ipc_handle()")

    def ipc_handle(self) -> bytes:
        return self._ipc

    def _release(self) -> list[Exception]:
        try:
            with cd.current(self.device) as drv:
                cd.check(drv.cuMemFree(self.address), "cuMemFree", device=self.device)
        except Exception as exc:
            return [exc]
        return []


class CudaBackend:
    """The ``--backend cuda`` memory backend; see the module docstring."""

    name = "cuda"
    shared_device = False

    def __init__(self, *, reserve: int, memory_limit: int | None = None, loader: LoaderSettings | None = None) -> None:
        """``reserve``: bytes left free on every device; ``memory_limit``: resident bytes per device at most;
        ``loader``: how loads read (the path is chosen here, once). Raises BackendError where no GPU is
        usable, or where ``loader`` demands a path that cannot run here (gds=on, engine=native)."""
        reason = cd.unavailable_reason()
        if reason is not None:
            raise BackendError("cuda", "unavailable", f"the cuda backend cannot run here: {reason}")
        self.reserve = int(reserve)
        self.memory_limit = memory_limit
        cores = len(os.sched_getaffinity(0)) or 4
        loader = loader or LoaderSettings()
        self.path: LoadPath = choose(
            loader, cores=cores, real_driver=getattr(cd.driver(), "__name__", "") == "cuda.bindings.driver"
        )
        self.note = self.path.note
        self.scheduler = FillScheduler(cores, share_cores=loader.share_cores)
        self._count = cd.device_count()
        self._bus_ids = [cd.pci_bus_id(d) or "" for d in range(self._count)]
        self._resident = [0] * self._count
        self._device_locks = [threading.Lock() for _ in range(self._count)]
        self._names: dict[int, str] = {}
        self._rings: dict[int, DeviceRing] = {}
        self._ring_lock = threading.Lock()
        self._closed = False
        for d in range(self._count):
            cd.primary_context(d)

    # --- devices and admission ---

    def _check_device(self, device: int) -> None:
        if not 0 <= device < self._count:
            raise InvalidArgument(f"no CUDA device {device} (this node has {self._count})", device=device)

    def _admissible(self, device: int, free: int) -> int:
        avail = max(0, free - self.reserve)
        if self.memory_limit is not None:
            avail = min(avail, max(0, self.memory_limit - self._resident[device]))
        return avail

    def free_bytes(self, device: int) -> int:
        """What admission lets this daemon allocate on ``device`` now (live)."""
        return self._admissible(device, cd.mem_info(device)[0])

    def devices(self) -> list[DeviceMemory]:
        out = []
        for d in range(self._count):
            if d not in self._names:
                self._names[d] = cd.device_name(d)
            free, total = cd.mem_info(d)
            if self.memory_limit is not None:
                total = min(total, self.memory_limit)
            out.append(DeviceMemory(d, self._names[d], total, self._admissible(d, free)))
        return out

    def granularity(self, device: int) -> int:
        self._check_device(device)
        return cd.vmm_granularity(device)

    def max_allocation(self) -> int | None:
        return None

    def _account(self, device: int, size: int) -> None:
        with self._device_locks[device]:
            self._resident[device] += size

    def _released(self, device: int, size: int) -> None:
        self._account(device, -size)

    def allocate(self, device: int, size: int, mode: AllocationMode) -> VmmAllocation | IpcAllocation:
        self._check_device(device)
        mode = AllocationMode(mode)
        size = cd.round_up(max(int(size), 1), cd.vmm_granularity(device))
        with self._device_locks[device]:
            free = self.free_bytes(device)
            if size > free:
                raise InsufficientMemory(
                    f"cuda:{device}: need {size} bytes, {free} free (after a reserve of {self.reserve} bytes)",
                    needed=size,
                    free=free,
                    device=device,
                )
            try:
                alloc = self._create_vmm(device, size) if mode is AllocationMode.FD else self._create_ipc(device, size)
            except CudaError as exc:
                if exc.code == cd.CUDA_ERROR_OUT_OF_MEMORY:
                    raise InsufficientMemory(
                        f"cuda:{device}: the driver is out of memory for {size} bytes ({free} looked free)",
                        needed=size,
                        free=free,
                        device=device,
                    ) from exc
                raise
            self._resident[device] += size
        return alloc

    def _create_vmm(self, device: int, size: int) -> VmmAllocation:
        with cd.current(device) as drv:
            handle = cd.check(drv.cuMemCreate(size, cd.vmm_prop(device), 0), "cuMemCreate", device=device, bytes=size)
            try:
                fd = int(
                    cd.check(
                        drv.cuMemExportToShareableHandle(
                            handle, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
                        ),
                        "cuMemExportToShareableHandle",
                        device=device,
                    )
                )
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
                    ptr, _ = cd.map_handle(device, handle, size, writable=True)
                except BaseException:
                    os.close(fd)
                    raise
            except BaseException:
                drv.cuMemRelease(handle)
                raise
        return VmmAllocation(device, size, handle, fd, ptr, self._bus_ids[device], self._released)

    def _create_ipc(self, device: int, size: int) -> IpcAllocation:
        with cd.current(device) as drv:
            ptr = int(cd.check(drv.cuMemAlloc(size), "cuMemAlloc", device=device, bytes=size))
            try:
                handle = cd.check(drv.cuIpcGetMemHandle(ptr), "cuIpcGetMemHandle", device=device)
                raw = bytes(handle.reserved)
                if len(raw) != 64:
                    raise BackendError("cuIpcGetMemHandle", "size", f"an IPC handle of {len(raw)} bytes, not 64")
            except BaseException:
                drv.cuMemFree(ptr)
                raise
        return IpcAllocation(device, size, ptr, raw, self._bus_ids[device], self._released)

    # --- loading ---

    def ring(self, device: int) -> DeviceRing:
        """The device's pinned ring, made on first use and kept."""
        self._check_device(device)
        with self._ring_lock:
            ring = self._rings.get(device)
            if ring is None:
                p = self.path
                ring = DeviceRing(device, threads=p.threads, depth=p.depth, slot_size=p.slot_size, memory=p.ring_memory)
                self._rings[device] = ring
            return ring

    def prepare(self) -> None:
        """Allocates every device's pinned ring ahead of the first load (pinning is slow; do it off the clock)."""
        if self.path.source == "bounce":
            for d in range(self._count):
                self.ring(d)

    def concurrent_fills(self, devices: list[int]) -> AbstractContextManager[None]:
        return self.scheduler.announce(devices)

    def fill(self, layout: RankLayout, allocations: list, progress: ProgressFn, cancel: threading.Event) -> str:
        if len(allocations) != len(layout.allocation_sizes):
            raise InvalidArgument(f"layout has {len(layout.allocation_sizes)} allocations, got {len(allocations)}")
        device = allocations[0].device
        for a, need in zip(allocations, layout.allocation_sizes):
            if a.device != device:
                raise InvalidArgument(f"a rank's allocations must share one device (cuda:{device} and cuda:{a.device})")
            if a.size < need:
                raise InvalidArgument(f"allocation of {a.size} bytes is smaller than the layout's {need}")
        bases = [int(a.address) for a in allocations]
        sizes = [int(a.size) for a in allocations]
        p = self.path
        if p.source == "gds":
            desc = gds.fill(device, layout, bases, p.threads, p.chunk_size, progress, cancel, compat=p.gds_compat)
        else:
            ring = self.ring(device)
            with ring.lock:
                desc = "bounce: " + bounce.fill(p, ring, self.scheduler, layout, bases, sizes, progress, cancel)
        if layout.zeros:
            _zero(device, layout, bases)
        desc = f"{desc} ({p.source_why})"
        log.info("rank %d: %d bytes loaded: %s", layout.rank, layout.nbytes, desc)
        return desc

    # --- restart ---

    def adopt(self, device: int, size: int, handle_type: HandleType, fd: int) -> VmmAllocation:
        """Re-imports a VMM fd handed back after a restart; takes ownership of ``fd``."""
        try:
            handle_type = HandleType(handle_type)
            if handle_type is not HandleType.CUDA_VMM_FD:
                raise InvalidArgument(
                    f"the cuda backend can only adopt CUDA_VMM_FD handles, not {handle_type.value} "
                    "(legacy IPC memory dies with the daemon that made it)"
                )
            self._check_device(device)
            gran = cd.vmm_granularity(device)
            if size <= 0 or size % gran:
                raise InvalidArgument(f"adopted size {size} is not a positive multiple of the granularity {gran}")
            with cd.current(device) as drv:
                handle = cd.import_fd(fd)
                try:
                    self._check_location(drv, handle, device)
                    ptr, _ = cd.map_handle(device, handle, size, writable=True)
                except BaseException:
                    drv.cuMemRelease(handle)
                    raise
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        self._account(device, size)
        return VmmAllocation(device, size, handle, fd, ptr, self._bus_ids[device], self._released)

    @staticmethod
    def _check_location(drv: Any, handle: Any, device: int) -> None:
        try:
            prop = cd.check(
                drv.cuMemGetAllocationPropertiesFromHandle(handle), "cuMemGetAllocationPropertiesFromHandle"
            )
            actual = int(prop.location.id)
        except CudaError:
            raise
        except Exception as exc:  # an API difference in the bindings: skip the check, say so
            log.warning("adopt: cannot read the allocation's device (%s); trusting the state file", exc)
            return
        if actual != device:
            raise InvalidArgument(f"the adopted allocation lives on cuda:{actual}, the state file says cuda:{device}")

    def close(self) -> None:
        """Frees the pinned rings and closes cuFile. Allocations are closed by their owners."""
        if self._closed:
            return
        self._closed = True
        with self._ring_lock:
            for ring in self._rings.values():
                with ring.lock:
                    ring.close()
            self._rings.clear()
        gds.DRIVER.close()


def _zero(device: int, layout: RankLayout, bases: list[int]) -> None:
    """Zeroes the layout's padding: fresh device memory holds whatever was there before, and an engine
    reads padding rows (a padded vocabulary's logits)."""
    with cd.current(device) as drv:
        for z in layout.zeros:
            cd.check(drv.cuMemsetD8(bases[z.allocation] + z.offset, 0, z.length), "cuMemsetD8", device=device)
        # The whole context, not one stream: the load is READY only after this, and what else it waits
        # for (another load's copies in flight on this device) is a chunk's worth at most.
        cd.check(drv.cuCtxSynchronize(), "cuCtxSynchronize", device=device)
