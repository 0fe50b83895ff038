"""The CUDA side of hotweights: lazy driver access, and mapping allocations another process exported.

Two handle types arrive here (``hotweights.mapping.regions.open_region`` dispatches them):

- ``CUDA_VMM_FD``: a POSIX fd exported from a ``cuMemCreate`` allocation. It is imported
  (``cuMemImportFromShareableHandle``), mapped into a fresh address range (``cuMemAddressReserve`` +
  ``cuMemMap``) and given read-only access on its device (``cuMemSetAccess``). A driver that refuses
  read-only access fails the attach (``CudaError``, saying so) rather than mapping the weights
  writable behind the caller's back; ``HOTWEIGHTS_CUDA_WRITABLE=1`` maps them read-write on purpose,
  and then a write by this process changes the weights every process on the GPU serves. The import
  handle is released at once: the mapping alone keeps the physical memory alive, and it stays valid
  even after the exporting daemon exits.
- ``CUDA_IPC``: a 64-byte legacy ``cudaIpcMemHandle`` (``cuIpcOpenMemHandle``). Limits: the memory is
  the exporter's ``cuMemAlloc`` allocation and does not outlive the exporting process; a process
  cannot open a handle it exported itself; and legacy IPC has no read-only mode, so the mapping is
  writable whatever ``HOTWEIGHTS_CUDA_WRITABLE`` says (``CudaRegion.writable`` is True): an in-place
  write changes the daemon's weights for every reader. Use ``allocation="fd"`` where that matters.

Either way the region's ``base`` is a flat uint8 tensor built by ``torch.as_tensor`` over an object
with ``__cuda_array_interface__``. torch keeps that object alive as long as any tensor uses the
memory; when the last one goes, the object synchronizes the device context (so kernels already
queued on the memory finish) and unmaps. ``close()`` only drops the region's own reference.

Device numbering: ``device`` is the CUDA ordinal as the daemon sees it; the client must see the
same GPUs in the same order (same ``CUDA_VISIBLE_DEVICES``).

The driver helpers here (``driver``, ``check``, ``current`` ...) are shared with the daemon's
``hotweights.cuda.devices``. Nothing imports CUDA until first use.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hotweights.errors import BackendError, CudaError, InvalidArgument

log = logging.getLogger("hotweights.cuda")

_lock = threading.RLock()
_driver: Any = None
_initialized = False
_contexts: dict[int, Any] = {}

IPC_HANDLE_BYTES = 64


# --- driver access --------------------------------------------------------------------------------


def driver() -> Any:
    """The ``cuda.bindings.driver`` module (or the fake set by ``set_driver``).

    Raises BackendError, not ImportError, when cuda-bindings cannot be imported.
    """
    global _driver
    if _driver is not None:
        return _driver
    with _lock:
        if _driver is None:
            try:
                from cuda.bindings import driver as mod  # lazy on purpose: CI has no cuda-bindings
            except Exception as exc:  # ImportError, or a broken install raising anything else
                raise BackendError(
                    "import cuda.bindings",
                    "unavailable",
                    f"CUDA needs cuda-bindings (pip install 'cuda-bindings>=12.6'): {type(exc).__name__}: {exc}",
                ) from exc
            _driver = mod
    return _driver


def set_driver(mod: Any) -> Any:
    """Replaces the driver module (unit tests use a fake); resets init and contexts. Returns the old one."""
    global _driver, _initialized
    with _lock:
        previous = _driver
        _driver = mod
        _initialized = False
        _contexts.clear()
        _granularity.clear()
    return previous


def error_name(code: int) -> str:
    """``CUDA_ERROR_OUT_OF_MEMORY`` for 2; ``CUresult N`` where the driver cannot say."""
    try:
        drv = driver()
        res = drv.cuGetErrorName(drv.CUresult(code))
        if int(res[0]) == 0 and res[1]:
            name = res[1]
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    return f"CUresult {code}"


def check(result: Any, op: str, **details: Any) -> Any:
    """Unpacks a cuda-bindings result ``(CUresult, *values)``: None, the one value, or a tuple.

    Raises CudaError(op, code) when the call failed.
    """
    if not isinstance(result, tuple) or not result:
        raise BackendError(
            op,
            "api",
            f"{op}: unexpected return value {result!r} from cuda-bindings "
            "(expected a (CUresult, ...) tuple: an API change?)",
        )
    code = int(result[0])
    if code != 0:
        name = error_name(code)
        where = "".join(f", {k}={v}" for k, v in details.items())
        raise CudaError(op, code, f"{op} failed: {name} ({code}){where}", error=name, **details)
    values = result[1:]
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def init() -> Any:
    """``cuInit(0)`` once per process; returns the driver module."""
    global _initialized
    drv = driver()
    if not _initialized:
        with _lock:
            if not _initialized:
                try:
                    res = drv.cuInit(0)
                except RuntimeError as exc:  # cuda-bindings raises this when libcuda.so.1 is missing
                    raise BackendError(
                        "cuInit", "no-driver", f"cuInit: the CUDA driver cannot be loaded: {exc}"
                    ) from exc
                check(res, "cuInit")
                _initialized = True
    return drv


def primary_context(device: int) -> Any:
    """The device's primary context (the one torch's runtime uses), retained once and never released.

    Releasing the last reference would destroy the context and every allocation made in it.
    """
    ctx = _contexts.get(device)
    if ctx is not None:
        return ctx
    drv = init()
    with _lock:
        ctx = _contexts.get(device)
        if ctx is None:
            dev = check(drv.cuDeviceGet(device), "cuDeviceGet", device=device)
            ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain", device=device)
            _contexts[device] = ctx
    return ctx


@contextmanager
def current(device: int) -> Iterator[Any]:
    """Pushes the device's primary context for the block and pops it after; yields the driver.

    The caller's current context (torch's current device) is the same afterwards.
    """
    drv = init()
    check(drv.cuCtxPushCurrent(primary_context(device)), "cuCtxPushCurrent", device=device)
    try:
        yield drv
    finally:
        check(drv.cuCtxPopCurrent(), "cuCtxPopCurrent", device=device)


def text(raw: Any) -> str:
    """A driver string (NUL-padded bytes) as text."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
    return str(raw).strip()


def pci_bus_id(device: int) -> str | None:
    """``0000:1b:00.0`` (lower case, as /sys spells it), or None where the driver will not say."""
    try:
        drv = init()
        handle = check(drv.cuDeviceGet(device), "cuDeviceGet", device=device)
        raw = check(drv.cuDeviceGetPCIBusId(64, handle), "cuDeviceGetPCIBusId", device=device)
    except Exception:
        return None
    return text(raw).lower() or None


_local_ordinals: dict[str, int] = {}


def local_device(bus_id: str, daemon_ordinal: int) -> int:
    """This process's ordinal for the GPU at PCI ``bus_id``.

    The daemon numbers GPUs as it sees them; a serving process often sees fewer, in another order
    (its own CUDA_VISIBLE_DEVICES), so ordinals alone would map the wrong GPU. Without a bus id
    (an older daemon) the daemon's ordinal is used as it is.
    """
    if not bus_id:
        return daemon_ordinal
    bus_id = bus_id.lower()
    with _lock:
        if bus_id not in _local_ordinals:
            count = int(check(init().cuDeviceGetCount(), "cuDeviceGetCount"))
            for d in range(count):
                found = pci_bus_id(d)
                if found:
                    _local_ordinals.setdefault(found, d)
        if bus_id not in _local_ordinals:
            raise InvalidArgument(
                f"the weights live on the GPU at PCI {bus_id} (daemon's cuda:{daemon_ordinal}), which this "
                f"process cannot see: check its CUDA_VISIBLE_DEVICES",
                bus_id=bus_id,
            )
        return _local_ordinals[bus_id]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- VMM helpers shared with the daemon --------------------------------------------------------------


def vmm_prop(device: int) -> Any:
    """Properties of a device allocation exportable as a POSIX fd."""
    drv = init()
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


_granularity: dict[int, int] = {}


def vmm_granularity(device: int) -> int:
    """The minimum VMM granularity on ``device`` (2 MiB on current GPUs); cached."""
    gran = _granularity.get(device)
    if gran is None:
        drv = init()
        gran = int(
            check(
                drv.cuMemGetAllocationGranularity(
                    vmm_prop(device), drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
                device=device,
            )
        )
        if gran <= 0 or gran & (gran - 1):
            raise BackendError(
                "cuMemGetAllocationGranularity",
                "value",
                f"cuMemGetAllocationGranularity returned {gran!r}, not a power of two",
            )
        _granularity[device] = gran
    return gran


def access_desc(device: int, writable: bool) -> Any:
    drv = init()
    desc = drv.CUmemAccessDesc()
    desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = (
        drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        if writable
        else drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
    )
    return desc


def map_handle(device: int, handle: Any, size: int, writable: bool | None = True) -> tuple[int, bool]:
    """Reserves ``size`` bytes of address space, maps ``handle`` and sets access for ``device``.

    ``writable=None`` (or False) maps read-only, and fails where the driver refuses read-only: a
    reader's mapping is never made writable unless asked for. Call with the device's context current.
    Undoes its own steps on failure. Returns (address, writable).
    """
    drv = init()
    gran = vmm_granularity(device)
    ptr = int(check(drv.cuMemAddressReserve(size, gran, 0, 0), "cuMemAddressReserve", size=size))
    try:
        check(drv.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap", size=size)
        try:
            if not writable:
                _set_read_only(drv, ptr, size, device)
                writable = False
            else:
                check(drv.cuMemSetAccess(ptr, size, [access_desc(device, True)], 1), "cuMemSetAccess", device=device)
        except BaseException:
            drv.cuMemUnmap(ptr, size)
            raise
    except BaseException:
        drv.cuMemAddressFree(ptr, size)
        raise
    return ptr, bool(writable)


def _set_read_only(drv: Any, ptr: int, size: int, device: int) -> None:
    try:
        read_only = [access_desc(device, False)]
        check(drv.cuMemSetAccess(ptr, size, read_only, 1), "cuMemSetAccess(read-only)", device=device)
    except CudaError as exc:
        # Fail closed: a writable mapping would let one engine's in-place write corrupt every reader's weights.
        fix = (
            "use a driver that supports read-only VMM mappings, or set HOTWEIGHTS_CUDA_WRITABLE=1 to map the "
            "weights read-write knowingly (a write by this process then changes them for every reader)"
        )
        raise CudaError(
            exc.op,
            exc.code,
            f"the CUDA driver refused a read-only mapping of the daemon's weights on cuda:{device} "
            f"({exc.op}: {exc.details.get('error', exc.code)}); hotweights does not map them writable unasked. "
            f"Fix: {fix}",
            device=device,
            error=exc.details.get("error", ""),
            fix=fix,
        ) from None


def unmap(ptr: int, size: int) -> list[CudaError]:
    """cuMemUnmap + cuMemAddressFree; returns the failures instead of raising, so cleanup goes on."""
    drv = init()
    errors: list[CudaError] = []
    for op, call in (
        ("cuMemUnmap", lambda: drv.cuMemUnmap(ptr, size)),
        ("cuMemAddressFree", lambda: drv.cuMemAddressFree(ptr, size)),
    ):
        try:
            check(call(), op, size=size)
        except CudaError as exc:
            errors.append(exc)
    return errors


def import_fd(fd: int) -> Any:
    """cuMemImportFromShareableHandle of a POSIX fd. The fd stays open: the caller closes it."""
    drv = init()
    return check(
        drv.cuMemImportFromShareableHandle(fd, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle",
        fd=fd,
    )


def release_handle(handle: Any) -> None:
    check(init().cuMemRelease(handle), "cuMemRelease")


# --- regions ------------------------------------------------------------------------------------------


class DeviceMapping:
    """The object torch keeps alive behind ``base``: device memory exposed through
    ``__cuda_array_interface__``, undone (``undo``) when collected or ``release()``d."""

    def __init__(self, ptr: int, size: int, device: int, undo: Callable[[], None]) -> None:
        self.ptr = ptr
        self.size = size
        self.device = device
        self._undo: Callable[[], None] | None = undo
        self._lock = threading.Lock()

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.size,), "typestr": "|u1", "data": (self.ptr, False), "version": 3, "strides": None}

    @property
    def released(self) -> bool:
        return self._undo is None

    def release(self) -> None:
        with self._lock:
            undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass  # interpreter shutdown: the driver may be gone already


def _undo(device: int, what: str, steps: Callable[[Any], list[CudaError]]) -> None:
    errors: list[Exception] = []
    try:
        with current(device) as drv:
            try:
                # Kernels already queued on this memory must finish before it disappears.
                check(drv.cuCtxSynchronize(), "cuCtxSynchronize", device=device)
            except CudaError as exc:
                errors.append(exc)
            errors += steps(drv)
    except Exception as exc:  # never raise from a finalizer
        errors.append(exc)
    for err in errors:
        log.error("releasing %s on cuda:%d: %s", what, device, err)


def _tensor_over(mapping: DeviceMapping) -> Any:
    import torch

    base = torch.as_tensor(mapping, device=torch.device("cuda", mapping.device))
    if base.data_ptr() != mapping.ptr or base.numel() != mapping.size:
        raise BackendError(
            "torch.as_tensor",
            "copy",
            f"torch did not wrap the mapping in place (ptr {base.data_ptr():#x} vs {mapping.ptr:#x}, "
            f"{base.numel()} vs {mapping.size} bytes)",
        )
    return base


class CudaRegion:
    """One imported allocation: ``base`` is a flat uint8 tensor on ``cuda:device``."""

    def __init__(self, handle_type: str, size: int, device: int, mapping: DeviceMapping, writable: bool) -> None:
        self.handle_type = handle_type
        self.size = size
        self.device = device
        self.writable = writable
        try:
            self.base = _tensor_over(mapping)[:size]
        except BaseException:
            mapping.release()
            raise

    @property
    def address(self) -> int:
        return self.base.data_ptr()

    def close(self) -> None:
        """Drops this region's reference; the mapping ends with the last tensor that uses it."""
        import torch

        self.base = torch.empty(0, dtype=torch.uint8)


def _writable_default() -> bool | None:
    return True if os.environ.get("HOTWEIGHTS_CUDA_WRITABLE", "") not in ("", "0") else None


def open_vmm(size: int, device: int, fd: int) -> CudaRegion:
    """Maps a ``CUDA_VMM_FD`` allocation; takes no ownership of ``fd``."""
    with current(device):
        mapped = round_up(max(size, 1), vmm_granularity(device))
        handle = import_fd(fd)
        try:
            ptr, writable = map_handle(device, handle, mapped, _writable_default())
        finally:
            # The mapping holds the physical memory from here on; the import handle is not needed.
            release_handle(handle)
    mapping = DeviceMapping(
        ptr, mapped, device, lambda: _undo(device, f"VMM mapping {ptr:#x}", lambda drv: unmap(ptr, mapped))
    )
    return CudaRegion("CUDA_VMM_FD", size, device, mapping, writable)


def open_ipc(size: int, device: int, ipc_handle: bytes) -> CudaRegion:
    """Opens a legacy ``CUDA_IPC`` handle (64 bytes); valid only while the exporting process lives."""
    if len(ipc_handle) != IPC_HANDLE_BYTES:
        raise InvalidArgument(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(ipc_handle)}")
    with current(device) as drv:
        handle = drv.CUipcMemHandle()
        handle.reserved = bytes(ipc_handle)
        flags = int(drv.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        ptr = int(check(drv.cuIpcOpenMemHandle(handle, flags), "cuIpcOpenMemHandle", device=device))

    def close_ipc(drv: Any) -> list[CudaError]:
        try:
            check(drv.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")
        except CudaError as exc:
            return [exc]
        return []

    mapping = DeviceMapping(ptr, size, device, lambda: _undo(device, f"IPC mapping {ptr:#x}", close_ipc))
    return CudaRegion("CUDA_IPC", size, device, mapping, writable=True)


def open_region(
    handle_type: str, size: int, device: int, fd: int | None, ipc_handle: bytes = b"", device_bus_id: str = ""
) -> CudaRegion:
    """Maps one CUDA allocation. Takes no ownership of ``fd``: the caller closes it after this returns.

    ``device`` is the daemon's ordinal; ``device_bus_id`` (when given) picks this process's own.
    """
    device = local_device(device_bus_id, device)
    if handle_type == "CUDA_VMM_FD":
        if fd is None:
            raise InvalidArgument("a CUDA_VMM_FD allocation arrived without its file descriptor")
        return open_vmm(size, device, fd)
    if handle_type == "CUDA_IPC":
        return open_ipc(size, device, bytes(ipc_handle))
    raise InvalidArgument(f"not a CUDA handle type: {handle_type!r}")
