"""The daemon's thin, lazy layer over the CUDA driver API (``cuda.bindings.driver``).

Nothing here imports CUDA at module import: the package imports and runs on machines with no GPU,
no driver and no cuda-bindings (CI), where ``device_count()`` answers 0. The core (lazy import,
``check()`` turning a failed CUresult into ``CudaError(op, code)``, primary contexts, VMM mapping)
is shared with the client library and lives in ``hotweights.cuda.driver``; this module adds what
only the daemon asks (devices, memory, NUMA placement).

Contexts: the daemon uses each device's primary context, the one torch and the runtime use.
``current(device)`` pushes it for a block and pops it; ``set_current(device)`` makes it current in
one of the daemon's own worker threads.
"""

from __future__ import annotations

import os
from typing import Any

from hotweights.cuda.driver import (  # noqa: F401 (re-exported for the backend and tests)
    access_desc,
    check,
    current,
    driver,
    error_name,
    import_fd,
    init,
    map_handle,
    pci_bus_id,
    primary_context,
    release_handle,
    round_up,
    set_driver,
    text,
    unmap,
    vmm_granularity,
    vmm_prop,
)
from hotweights.errors import BackendError

CUDA_ERROR_OUT_OF_MEMORY = 2


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None when at least one device is visible."""
    try:
        drv = init()
        n = int(check(drv.cuDeviceGetCount(), "cuDeviceGetCount"))
    except BackendError as exc:
        return exc.message
    except Exception as exc:  # an unexpected failure inside the bindings still means "no GPU" for auto
        return f"{type(exc).__name__}: {exc}"
    return None if n > 0 else "no CUDA device visible"


def device_count() -> int:
    """Visible CUDA devices; 0 without cuda-bindings, without a driver or without a device."""
    if unavailable_reason() is not None:
        return 0
    return int(check(init().cuDeviceGetCount(), "cuDeviceGetCount"))


def device_handle(device: int) -> Any:
    return check(init().cuDeviceGet(device), "cuDeviceGet", device=device)


def set_current(device: int) -> None:
    """Makes the device's primary context current in the calling thread."""
    check(init().cuCtxSetCurrent(primary_context(device)), "cuCtxSetCurrent", device=device)


def device_name(device: int) -> str:
    return text(check(init().cuDeviceGetName(256, device_handle(device)), "cuDeviceGetName", device=device))


def device_total(device: int) -> int:
    return int(check(init().cuDeviceTotalMem(device_handle(device)), "cuDeviceTotalMem", device=device))


def mem_info(device: int) -> tuple[int, int]:
    """(free, total) bytes on the device, live from cuMemGetInfo."""
    with current(device) as drv:
        free, total = check(drv.cuMemGetInfo(), "cuMemGetInfo", device=device)
    return int(free), int(total)


# --- NUMA placement (best effort: plain /sys reads) -------------------------------------------------


def parse_cpulist(text: str) -> list[int]:
    """``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def numa_nodes(sys_root: str = "/sys") -> list[int]:
    base = os.path.join(sys_root, "devices/system/node")
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())


def numa_cpus(device: int, sys_root: str = "/sys") -> tuple[int | None, list[int]]:
    """(node, cpus) of the device's NUMA node when the machine has more than one node, else (None, [])."""
    if len(numa_nodes(sys_root)) < 2:
        return None, []
    bus = pci_bus_id(device)
    if not bus:
        return None, []
    try:
        with open(os.path.join(sys_root, "bus/pci/devices", bus, "numa_node")) as f:
            node = int(f.read().strip())
        if node < 0:
            return None, []
        with open(os.path.join(sys_root, f"devices/system/node/node{node}/cpulist")) as f:
            cpus = parse_cpulist(f.read())
    except (OSError, ValueError):
        return None, []
    allowed = os.sched_getaffinity(0)
    return node, [c for c in cpus if c in allowed]
