"""A fake ``cuda.bindings.driver`` (``FakeDriver``) and ``cuda.bindings.cufile`` (``FakeCuFile``) for
the cuda backend's tests without a GPU, with their fixtures (``fake``, ``fake_cufile``) and helpers.

The fake driver emulates the calls the backend makes with host memory: VMM allocations are host
buffers behind fake device addresses, copies run at once, and every call that needs a current
context checks that one is pushed in the calling thread. It runs in CI, where neither a GPU nor
cuda-bindings is installed. A test module uses the fixtures by importing them.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import mmap
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotweights.cuda import driver as cuda_import
from hotweights.format.checkpoint import open_checkpoint
from hotweightsd.core.backend import AllocationMode
from hotweightsd.core.layout import plan_rank
from hotweightsd.loaders import gds
from hotweightsd.loaders.settings import LoaderSettings

MiB = 1024 * 1024
GRAN = 2 * MiB


# --- a fake driver --------------------------------------------------------------------------------------


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_UNKNOWN = 999


def _enum(**members):
    return type("E", (), members)


class _Location:
    def __init__(self) -> None:
        self.type = None
        self.id = 0


class CUmemAllocationProp:
    def __init__(self) -> None:
        self.type = None
        self.location = _Location()
        self.requestedHandleTypes = None


class CUmemAccessDesc:
    def __init__(self) -> None:
        self.location = _Location()
        self.flags = None


class CUipcMemHandle:
    def __init__(self) -> None:
        self.reserved = bytes(64)


class FakeDriver:
    CUresult = CUresult
    CUmemAllocationProp = CUmemAllocationProp
    CUmemAccessDesc = CUmemAccessDesc
    CUipcMemHandle = CUipcMemHandle
    CUmemAllocationType = _enum(CU_MEM_ALLOCATION_TYPE_PINNED=1)
    CUmemLocationType = _enum(CU_MEM_LOCATION_TYPE_DEVICE=1)
    CUmemAllocationHandleType = _enum(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR=1)
    CUmemAllocationGranularity_flags = _enum(CU_MEM_ALLOC_GRANULARITY_MINIMUM=0)
    CUmemAccess_flags = _enum(CU_MEM_ACCESS_FLAGS_PROT_READ=1, CU_MEM_ACCESS_FLAGS_PROT_READWRITE=3)
    CUstream_flags = _enum(CU_STREAM_NON_BLOCKING=1)
    CUevent_flags = _enum(CU_EVENT_BLOCKING_SYNC=1, CU_EVENT_DISABLE_TIMING=2)
    CUipcMem_flags = _enum(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS=1)
    CU_MEMHOSTALLOC_PORTABLE = 1
    CU_MEMHOSTREGISTER_PORTABLE = 1
    CU_MEMHOSTREGISTER_READ_ONLY = 8

    def __init__(self, devices: int = 1, total: int = 64 * MiB, no_driver: bool = False) -> None:
        self.ndev = devices
        self.total = total
        self.no_driver = no_driver
        self.lock = threading.RLock()
        self.tls = threading.local()
        self.fail: dict[str, int] = {}  # op -> CUresult for its next call
        self.calls: dict[str, int] = {}
        self.phys: dict[int, dict] = {}  # id -> {"buf", "size", "device", "refs"}
        self.handles: dict[int, int] = {}  # handle -> phys id
        self.vas: dict[int, dict] = {}  # reserved address -> {"size", "phys"}
        self.exports: dict[int, int] = {}  # memfd inode -> phys id
        self.host: dict[int, object] = {}  # pinned host allocations
        self.registered: dict[int, int] = {}  # registered host ranges
        self.legacy: dict[int, dict] = {}  # cuMemAlloc: address -> {"buf", "size", "device"}
        self.streams = 0
        self.events = 0
        self.event_flags: set[int] = set()
        self._ids = itertools.count(1)
        self._va = itertools.count(1)

    # helpers
    def _enter(self, op: str, ctx: bool = False) -> CUresult | None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.no_driver:
            raise RuntimeError("Failed to dlopen libcuda.so.1")
        if op in self.fail:
            return CUresult(self.fail.pop(op))
        if ctx and not self._stack():
            return CUresult.CUDA_ERROR_INVALID_CONTEXT
        return None

    def _stack(self) -> list:
        if not hasattr(self.tls, "stack"):
            self.tls.stack = []
        return self.tls.stack

    def current_device(self) -> int:
        return self._stack()[-1]

    def used(self, device: int) -> int:
        return sum(p["size"] for p in self.phys.values() if p["device"] == device) + sum(
            a["size"] for a in self.legacy.values() if a["device"] == device
        )

    def host_address(self, ptr: int, n: int) -> int:
        """The host address behind a fake device address (VMM mapping or cuMemAlloc)."""
        for va, m in self.vas.items():
            if m["phys"] is not None and va <= ptr and ptr + n <= va + m["size"]:
                return ctypes.addressof(self.phys[m["phys"]]["buf"]) + (ptr - va)
        for addr, a in self.legacy.items():
            if addr <= ptr and ptr + n <= addr + a["size"]:
                return ptr
        raise AssertionError(f"copy to unmapped device range {ptr:#x}+{n}")

    def read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(self.host_address(ptr, n), n)

    def _drop(self, pid: int) -> None:
        p = self.phys[pid]
        p["refs"] -= 1
        if p["refs"] == 0:
            del self.phys[pid]

    # API
    def cuInit(self, flags):
        return (self._enter("cuInit") or CUresult.CUDA_SUCCESS,)

    def cuGetErrorName(self, err):
        return (CUresult.CUDA_SUCCESS, CUresult(err).name.encode())

    def cuDeviceGetCount(self):
        err = self._enter("cuDeviceGetCount")
        if err or not self.ndev:
            return (err or CUresult.CUDA_ERROR_NO_DEVICE, 0)
        return (CUresult.CUDA_SUCCESS, self.ndev)

    def cuDeviceGet(self, ordinal):
        err = self._enter("cuDeviceGet")
        if err or not 0 <= ordinal < self.ndev:
            return (err or CUresult.CUDA_ERROR_INVALID_VALUE, None)
        return (CUresult.CUDA_SUCCESS, ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        return (self._enter("cuDevicePrimaryCtxRetain") or CUresult.CUDA_SUCCESS, ("ctx", dev))

    def cuCtxPushCurrent(self, ctx):
        self._stack().append(ctx[1])
        return (CUresult.CUDA_SUCCESS,)

    def cuCtxPopCurrent(self):
        st = self._stack()
        if not st:
            return (CUresult.CUDA_ERROR_INVALID_CONTEXT, None)
        return (CUresult.CUDA_SUCCESS, ("ctx", st.pop()))

    def cuCtxSetCurrent(self, ctx):
        st = self._stack()
        if st:
            st[-1] = ctx[1]
        else:
            st.append(ctx[1])
        return (CUresult.CUDA_SUCCESS,)

    def cuCtxSynchronize(self):
        return (self._enter("cuCtxSynchronize", ctx=True) or CUresult.CUDA_SUCCESS,)

    def cuDeviceGetName(self, n, dev):
        return (CUresult.CUDA_SUCCESS, f"Fake GPU {dev}".encode() + b"\0" * 8)

    def cuDeviceTotalMem(self, dev):
        return (CUresult.CUDA_SUCCESS, self.total)

    def cuDeviceGetPCIBusId(self, n, dev):
        return (CUresult.CUDA_SUCCESS, f"0000:{dev + 0x1B:02X}:00.0".encode())

    def cuMemGetInfo(self):
        err = self._enter("cuMemGetInfo", ctx=True)
        if err:
            return (err, 0, 0)
        return (CUresult.CUDA_SUCCESS, self.total - self.used(self.current_device()), self.total)

    def cuMemGetAllocationGranularity(self, prop, option):
        assert isinstance(prop, CUmemAllocationProp)
        return (self._enter("cuMemGetAllocationGranularity") or CUresult.CUDA_SUCCESS, GRAN)

    def cuMemCreate(self, size, prop, flags):
        err = self._enter("cuMemCreate")
        if err:
            return (err, None)
        assert size % GRAN == 0 and prop.location.id < self.ndev
        assert prop.requestedHandleTypes == 1
        with self.lock:
            if self.used(prop.location.id) + size > self.total:
                return (CUresult.CUDA_ERROR_OUT_OF_MEMORY, None)
            pid = next(self._ids)
            self.phys[pid] = {
                "buf": ctypes.create_string_buffer(size),
                "size": size,
                "device": prop.location.id,
                "refs": 1,
            }
            h = next(self._ids)
            self.handles[h] = pid
        return (CUresult.CUDA_SUCCESS, h)

    def cuMemRelease(self, h):
        err = self._enter("cuMemRelease")
        if err:
            return (err,)
        with self.lock:
            self._drop(self.handles.pop(h))
        return (CUresult.CUDA_SUCCESS,)

    def cuMemExportToShareableHandle(self, h, kind, flags):
        err = self._enter("cuMemExportToShareableHandle")
        if err:
            return (err, None)
        fd = os.memfd_create("fake-vmm")
        self.exports[os.fstat(fd).st_ino] = self.handles[h]
        return (CUresult.CUDA_SUCCESS, fd)

    def cuMemImportFromShareableHandle(self, fd, kind):
        err = self._enter("cuMemImportFromShareableHandle")
        if err:
            return (err, None)
        pid = self.exports.get(os.fstat(fd).st_ino)
        if pid is None or pid not in self.phys:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        with self.lock:
            self.phys[pid]["refs"] += 1
            h = next(self._ids)
            self.handles[h] = pid
        return (CUresult.CUDA_SUCCESS, h)

    def cuMemGetAllocationPropertiesFromHandle(self, h):
        prop = CUmemAllocationProp()
        prop.location.id = self.phys[self.handles[h]]["device"]
        return (CUresult.CUDA_SUCCESS, prop)

    def cuMemAddressReserve(self, size, align, addr, flags):
        err = self._enter("cuMemAddressReserve")
        if err:
            return (err, None)
        va = 0x5000_0000_0000 + next(self._va) * (1 << 36)
        self.vas[va] = {"size": size, "phys": None, "access": None}
        return (CUresult.CUDA_SUCCESS, va)

    def cuMemAddressFree(self, ptr, size):
        err = self._enter("cuMemAddressFree")
        m = self.vas.get(ptr)
        if err or m is None or m["phys"] is not None:
            return (err or CUresult.CUDA_ERROR_INVALID_VALUE,)
        del self.vas[ptr]
        return (CUresult.CUDA_SUCCESS,)

    def cuMemMap(self, ptr, size, offset, h, flags):
        err = self._enter("cuMemMap")
        if err:
            return (err,)
        m = self.vas[ptr]
        pid = self.handles[h]
        assert size == m["size"] <= self.phys[pid]["size"]
        with self.lock:
            m["phys"] = pid
            self.phys[pid]["refs"] += 1
        return (CUresult.CUDA_SUCCESS,)

    def cuMemUnmap(self, ptr, size):
        err = self._enter("cuMemUnmap")
        m = self.vas.get(ptr)
        if err or m is None or m["phys"] is None:
            return (err or CUresult.CUDA_ERROR_INVALID_VALUE,)
        with self.lock:
            self._drop(m["phys"])
            m["phys"] = None
        return (CUresult.CUDA_SUCCESS,)

    def cuMemSetAccess(self, ptr, size, descs, count):
        err = self._enter("cuMemSetAccess")
        if err:
            return (err,)
        assert count == len(descs) == 1 and isinstance(descs[0], CUmemAccessDesc)
        self.vas[ptr]["access"] = descs[0].flags
        return (CUresult.CUDA_SUCCESS,)

    def cuMemAlloc(self, size):
        err = self._enter("cuMemAlloc", ctx=True)
        if err:
            return (err, None)
        buf = ctypes.create_string_buffer(size)
        addr = ctypes.addressof(buf)
        self.legacy[addr] = {"buf": buf, "size": size, "device": self.current_device()}
        return (CUresult.CUDA_SUCCESS, addr)

    def cuMemFree(self, ptr):
        err = self._enter("cuMemFree", ctx=True)
        if err:
            return (err,)
        del self.legacy[ptr]
        return (CUresult.CUDA_SUCCESS,)

    def cuIpcGetMemHandle(self, ptr):
        err = self._enter("cuIpcGetMemHandle", ctx=True)
        h = CUipcMemHandle()
        h.reserved = ptr.to_bytes(8, "little") + bytes(56)
        return (err or CUresult.CUDA_SUCCESS, h)

    def cuMemHostAlloc(self, size, flags):
        err = self._enter("cuMemHostAlloc", ctx=True)
        if err:
            return (err, None)
        buf = mmap.mmap(-1, size)  # page-aligned, like real pinned memory
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.host[addr] = buf
        return (CUresult.CUDA_SUCCESS, addr)

    def cuMemFreeHost(self, ptr):
        del self.host[ptr]
        return (CUresult.CUDA_SUCCESS,)

    def cuMemHostRegister(self, ptr, size, flags):
        err = self._enter("cuMemHostRegister", ctx=True)
        if err:
            return (err,)
        # read-only: page-cache pages in mmap mode; portable: the huge-page ring
        assert flags in (self.CU_MEMHOSTREGISTER_READ_ONLY, self.CU_MEMHOSTREGISTER_PORTABLE)
        assert ptr % 4096 == 0 and size % 4096 == 0
        with self.lock:
            for p, n in self.registered.items():
                if p < ptr + size and ptr < p + n:
                    return (CUresult.CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,)
            self.registered[ptr] = size
        return (CUresult.CUDA_SUCCESS,)

    def cuMemHostUnregister(self, ptr):
        with self.lock:
            del self.registered[ptr]
        return (CUresult.CUDA_SUCCESS,)

    def cuStreamCreate(self, flags):
        err = self._enter("cuStreamCreate", ctx=True)
        self.streams += 1
        return (err or CUresult.CUDA_SUCCESS, ("stream", self.streams))

    def cuStreamDestroy(self, s):
        self.streams -= 1
        return (CUresult.CUDA_SUCCESS,)

    def cuStreamSynchronize(self, s):
        return (self._enter("cuStreamSynchronize", ctx=True) or CUresult.CUDA_SUCCESS,)

    def cuEventCreate(self, flags):
        self.event_flags.add(flags)
        self.events += 1
        return (CUresult.CUDA_SUCCESS, ("event", self.events))

    def cuEventDestroy(self, e):
        self.events -= 1
        return (CUresult.CUDA_SUCCESS,)

    def cuEventRecord(self, e, s):
        return (self._enter("cuEventRecord", ctx=True) or CUresult.CUDA_SUCCESS,)

    def cuEventSynchronize(self, e):
        return (self._enter("cuEventSynchronize", ctx=True) or CUresult.CUDA_SUCCESS,)

    def cuMemcpyDtoH(self, dst, src, n):
        err = self._enter("cuMemcpyDtoH", ctx=True)
        if err:
            return (err,)
        ctypes.memmove(dst, self.host_address(src, n), n)
        return (CUresult.CUDA_SUCCESS,)

    def cuMemcpyHtoDAsync(self, dst, src, n, stream):
        err = self._enter("cuMemcpyHtoDAsync", ctx=True)
        if err:
            return (err,)
        ctypes.memmove(self.host_address(dst, n), src, n)
        return (CUresult.CUDA_SUCCESS,)


@pytest.fixture
def fake():
    drv = FakeDriver(devices=2)
    previous = cuda_import.set_driver(drv)
    yield drv
    cuda_import.set_driver(previous)


def make_backend(reserve: int = 0, memory_limit: int | None = None, **loader):
    """A CudaBackend; ``loader`` holds LoaderSettings fields (GDS off unless given)."""
    from hotweightsd.backends.cuda import CudaBackend

    loader.setdefault("gds", "off")
    return CudaBackend(reserve=reserve, memory_limit=memory_limit, loader=LoaderSettings(**loader))


def write_ckpt(path: Path, seed: int = 0, n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "bf16": torch.randn(300, 257, generator=g).bfloat16(),
        "f32": torch.randn(17, 33, generator=g),
        "i8": torch.randint(-100, 100, (5, 7), dtype=torch.int8, generator=g),
        "f8": torch.randn(1000, 3, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
    }
    for i in range(n):
        tensors[f"layer.{i}.w"] = torch.randn(64 + i, 129, generator=g).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


def load_rank(path: Path):
    ck = open_checkpoint(path)
    return ck.ranks[0]


def prepared(tmp_path: Path, **backend_options):
    """A checkpoint on disk, its layout, a backend and the allocations for it."""
    path = tmp_path / "m.safetensors"
    write_ckpt(path)
    layout = plan_rank(load_rank(path), GRAN)
    backend_options.setdefault("threads", 2)
    backend_options.setdefault("chunk_size", 64 * 1024)
    b = make_backend(**backend_options)
    return path, layout, b, [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]


def check_contents(drv: FakeDriver, layout, allocations) -> None:
    for p in layout.placements:
        if not p.nbytes:
            continue
        with open(layout.files[p.file], "rb") as f:
            f.seek(p.file_offset)
            want = f.read(p.nbytes)
        got = drv.read(allocations[p.allocation].address + p.offset, p.nbytes)
        assert got == want, f"{p.name} differs"


# --- the GDS path with a fake cuFile ---------------------------------------------------------------------


class FakeCuFileError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HANDLE_NOT_REGISTERED ({status}): file descriptor is not registered")
        self.status = status


class FakeCuFile:
    """``cuda.bindings.cufile`` as gds.py uses it: reads land in the fake driver's device memory."""

    FileHandleType = _enum(OPAQUE_FD=1)
    BoolConfigParameter = _enum(PROPERTIES_ALLOW_COMPAT_MODE=1, FORCE_COMPAT_MODE=2)

    def __init__(self, drv: FakeDriver, refuse: int | None = None) -> None:
        self.drv, self.refuse = drv, refuse
        self.descrs: dict[int, object] = {}
        self.handles: dict[int, int] = {}  # handle -> fd
        self.params: dict[int, bool] = {}
        self.opened = 0
        self.env_at_open: dict[str, str | None] = {}
        self._ids = itertools.count(100)
        outer = self

        class Descr:
            def __init__(self) -> None:
                self.type, self.fs_ops = 0, None
                self.handle = type("H", (), {"fd": -1})()
                self.ptr = next(outer._ids)
                outer.descrs[self.ptr] = self

        self.Descr = Descr

    def get_version(self):
        return 1150

    def set_parameter_bool(self, param, value):
        assert not self.opened, "cuFile parameters must be set before the driver opens"
        self.params[param] = value

    def driver_open(self):
        self.env_at_open = {k: os.environ.get(k) for k in ("CUFILE_FORCE_COMPAT_MODE", "CUFILE_ALLOW_COMPAT_MODE")}
        assert self.drv._stack(), "cuFileDriverOpen without a current context"
        self.opened += 1

    def driver_close(self):
        self.opened = 0

    def handle_register(self, ptr):
        d = self.descrs[ptr]
        assert d.type == 1 and d.fs_ops == 0
        if self.refuse:
            raise FakeCuFileError(self.refuse)
        h = next(self._ids)
        self.handles[h] = d.handle.fd
        return h

    def handle_deregister(self, h):
        del self.handles[h]

    def read(self, h, base, size, file_offset, buf_offset):
        data = os.pread(self.handles[h], min(size, 100_000), file_offset)  # short reads, as cuFile may do
        ctypes.memmove(self.drv.host_address(base + buf_offset, len(data)), data, len(data))
        return len(data)


@pytest.fixture
def fake_cufile(fake, monkeypatch):
    for var in ("CUFILE_FORCE_COMPAT_MODE", "CUFILE_ALLOW_COMPAT_MODE", "CUFILE_LOGFILE_PATH"):
        monkeypatch.delenv(var, raising=False)  # restored after the test: the driver sets them
    cf = FakeCuFile(fake)
    monkeypatch.setattr(gds, "cufile_module", lambda: cf)
    monkeypatch.setattr(gds, "DRIVER", gds.CuFileDriver())
    return cf
