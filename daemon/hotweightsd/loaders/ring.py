"""A device's pinned host ring: the slots reads land in before their copies to the GPU.

Made once per device and kept across loads (pinning costs more than copying). Reader ``w`` owns
``depth`` slots, one stream, and one event per slot (the copies that last used it). Where the node
has several NUMA nodes, the ring is allocated, and its readers run, on the CPUs of the GPU's node
(best effort). The slots are the driver's pinned memory (``cuMemHostAlloc``), or with
``ring_memory = "huge"`` transparent huge pages registered with the driver (``hostmem.HugePages``), where
an O_DIRECT read lands in a few physically contiguous runs instead of a page at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from hotweights.cuda import devices as cd
from hotweights.errors import BackendError
from hotweightsd.loaders import hostmem
from hotweightsd.loaders.hostmem import HugePages
from hotweightsd.loaders.plan import DIRECT_ALIGN

log = logging.getLogger("hotweightsd.cuda")


def run_on_cpus(cpus: list[int], fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` in a helper thread bound to ``cpus`` (first touch places its pages on their node)."""
    if not cpus:
        return fn()
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="hw-pin-alloc")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class DeviceRing:
    """Per-device loader state kept across loads: pinned slots, one stream per reader, one event per slot."""

    def __init__(self, device: int, *, threads: int, depth: int, slot_size: int, memory: str = "driver") -> None:
        if memory not in ("driver", "huge"):
            raise ValueError(f"ring memory {memory!r}: driver or huge")
        self.device = device
        self.memory = memory
        self._huge: HugePages | None = None
        self.huge_share: float | None = None  # of a huge ring: what the kernel backed with huge pages
        self.threads = threads
        self.depth = depth
        self.slot_size = slot_size
        self.node, self.cpus = cd.numa_cpus(device)
        self.host_ptr = 0
        self.streams: list[Any] = []
        self.events: list[list[Any]] = []
        self._views: list[memoryview] = []
        self.lock = threading.Lock()  # one fill at a time per device
        try:
            with cd.current(device) as drv:
                total = threads * depth * slot_size
                self.host_ptr = run_on_cpus(self.cpus, lambda: self._alloc_host(drv, total))
                if self.host_ptr % DIRECT_ALIGN:
                    raise BackendError(
                        "cuMemHostAlloc",
                        "alignment",
                        f"pinned memory at {self.host_ptr:#x} is not {DIRECT_ALIGN}-byte aligned",
                    )
                whole = memoryview((ctypes.c_char * total).from_address(self.host_ptr)).cast("B")
                self._views = [whole[i * slot_size : (i + 1) * slot_size] for i in range(threads * depth)]
                sflag = int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
                eflag = int(drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
                for _ in range(threads):
                    self.streams.append(cd.check(drv.cuStreamCreate(sflag), "cuStreamCreate"))
                    self.events.append([cd.check(drv.cuEventCreate(eflag), "cuEventCreate") for _ in range(depth)])
        except BaseException:
            self.close()
            raise

    def _alloc_host(self, drv: Any, total: int) -> int:
        """Pinned memory for the ring, allocated by the calling thread (first touch places it on its node)."""
        with cd.current(self.device):
            if self.memory == "driver":
                flags = int(drv.CU_MEMHOSTALLOC_PORTABLE)
                return int(cd.check(drv.cuMemHostAlloc(total, flags), "cuMemHostAlloc", bytes=total))
            huge = hostmem.registered(drv, total)
            self._huge = huge
            self.huge_share = huge.huge_share()
            return huge.ptr

    def slot(self, worker: int, k: int) -> tuple[int, memoryview]:
        i = worker * self.depth + k
        return self.host_ptr + i * self.slot_size, self._views[i]

    def describe_numa(self) -> str:
        return f", NUMA node {self.node} ({len(self.cpus)} cpus)" if self.node is not None and self.cpus else ""

    def describe_memory(self) -> str:
        """The ring's memory, and for huge pages how much of it the kernel backed with them."""
        if self.memory == "driver":
            return ", cuMemHostAlloc ring"
        backed = "" if self.huge_share is None else f" ({self.huge_share:.0%} backed)"
        return f", huge-page ring{backed}"

    def close(self) -> None:
        errors: list[Exception] = []
        try:
            with cd.current(self.device) as drv:
                for evs in self.events:
                    for ev in evs:
                        errors += _collect(lambda: cd.check(drv.cuEventDestroy(ev), "cuEventDestroy"))
                for st in self.streams:
                    errors += _collect(lambda: cd.check(drv.cuStreamDestroy(st), "cuStreamDestroy"))
                for v in self._views:
                    v.release()
                self._views = []
                if self._huge is not None:
                    huge = self._huge
                    failed = _collect(lambda: cd.check(drv.cuMemHostUnregister(huge.ptr), "cuMemHostUnregister"))
                    errors += failed
                    if not failed:  # memory the driver still holds pinned is never unmapped under it
                        huge.close()
                elif self.host_ptr:
                    errors += _collect(lambda: cd.check(drv.cuMemFreeHost(self.host_ptr), "cuMemFreeHost"))
        except Exception as exc:
            errors.append(exc)
        self.events, self.streams, self.host_ptr, self._huge = [], [], 0, None
        for e in errors:
            log.error("releasing the pinned ring of cuda:%d: %s", self.device, e)


def _collect(fn: Callable[[], Any]) -> list[Exception]:
    try:
        fn()
    except Exception as exc:
        return [exc]
    return []
