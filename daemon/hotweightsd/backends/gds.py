"""The GPUDirect Storage path: cuFile reads straight from the files into the resident allocation.

cuFile comes from ``cuda.bindings.cufile`` (part of cuda-bindings; it loads ``libcufile.so``, which
the ``nvidia-cufile`` wheel that torch depends on provides). With ``/dev/nvidia-fs*`` present cuFile
DMAs storage -> GPU; without it, cuFile's *compatibility mode* reads through its own host bounce
buffers, which is only useful as a correctness check of this path (``gds="compat"`` forces it).

The backend picks this path only when ``/dev/nvidia-fs*`` exists (or when told to); it never falls
back silently: ``CudaBackend.fill`` says which path ran and why in its description and its log.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from typing import Any, Callable

from hotweights.errors import Aborted, BackendError, BadCheckpoint
from hotweightsd.backends import cuda_driver as cd
from hotweightsd.backends.bounce import open_source
from hotweightsd.backends.reader import split
from hotweightsd.core.layout import RankLayout

log = logging.getLogger("hotweightsd.cuda")

MiB = 1024 * 1024


def nvidia_fs_devices() -> list[str]:
    return sorted(glob.glob("/dev/nvidia-fs*"))


def cufile_module() -> Any:
    try:
        from cuda.bindings import cufile  # lazy: needs cuda-bindings >= 12.9 and libcufile.so
    except Exception as exc:
        raise BackendError("import cuda.bindings.cufile", "unavailable",
                           f"cuFile bindings cannot be imported: {type(exc).__name__}: {exc}") from exc
    return cufile


def library_reason() -> str | None:
    """Why cuFile itself cannot be used (bindings or libcufile missing), or None."""
    try:
        cufile = cufile_module()
        cufile.get_version()
    except BackendError as exc:
        return exc.message
    except Exception as exc:
        return f"libcufile cannot be loaded: {type(exc).__name__}: {exc}"
    return None


def unavailable_reason() -> str | None:
    """Why the GDS path is not taken automatically, or None when it is usable."""
    if not nvidia_fs_devices():
        return "GDS unavailable: no /dev/nvidia-fs*"
    reason = library_reason()
    return f"GDS unavailable: {reason}" if reason else None


class CuFileDriver:
    """cuFileDriverOpen once per process; compatibility mode is chosen before the first open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened = False
        self.compat = False
        self.notes: list[str] = []

    def open(self, compat: bool) -> None:
        with self._lock:
            if self.opened:
                if compat and not self.compat:
                    self.notes.append("compatibility mode asked after cuFile was opened without it")
                return
            cufile = cufile_module()
            os.environ.setdefault("CUFILE_LOGFILE_PATH", "/tmp/hotweights-cufile.log")
            if compat:
                os.environ["CUFILE_FORCE_COMPAT_MODE"] = "true"
                for name in ("PROPERTIES_ALLOW_COMPAT_MODE", "FORCE_COMPAT_MODE"):
                    try:
                        cufile.set_parameter_bool(int(getattr(cufile.BoolConfigParameter, name)), True)
                    except Exception as exc:  # older libcufile: the environment variable still applies
                        self.notes.append(f"set {name}: {type(exc).__name__}: {exc}")
            try:
                cufile.driver_open()
            except Exception as exc:
                raise BackendError("cuFileDriverOpen", getattr(exc, "status", "error"),
                                   f"cuFileDriverOpen failed: {type(exc).__name__}: {exc}") from exc
            self.opened, self.compat = True, compat
            for n in self.notes:
                log.warning("cuFile: %s", n)

    def close(self) -> None:
        with self._lock:
            if self.opened:
                try:
                    cufile_module().driver_close()
                except Exception as exc:
                    log.error("cuFileDriverClose: %s", exc)
                self.opened = False


DRIVER = CuFileDriver()


def _register(cufile: Any, fd: int, path: str) -> int:
    descr = cufile.Descr()
    descr.type = cufile.FileHandleType.OPAQUE_FD
    descr.handle.fd = fd
    descr.fs_ops = 0
    try:
        return int(cufile.handle_register(descr.ptr))
    except Exception as exc:
        raise BackendError("cuFileHandleRegister", getattr(exc, "status", "error"),
                           f"{path}: cuFileHandleRegister failed: {type(exc).__name__}: {exc}") from exc


def fill(device: int, layout: RankLayout, bases: list[int], threads: int, chunk: int,
         progress: Callable[[int], None], cancel: threading.Event, compat: bool) -> str:
    """Reads every segment of ``layout`` with cuFileRead into the allocations at ``bases``."""
    cufile = cufile_module()
    DRIVER.open(compat)
    pieces = list(split(layout.segments(), chunk))
    needed = [0] * len(layout.files)
    for s in layout.segments():
        needed[s.file] = max(needed[s.file], s.file_offset + s.length)
    fds: list[int] = []
    handles: list[int] = []
    direct = 0
    try:
        for path, need in zip(layout.files, needed):
            fd, is_direct = open_source(path, True)
            fds.append(fd)
            direct += is_direct
            size = os.fstat(fd).st_size
            if size < need:
                raise BadCheckpoint(f"{path}: truncated: {size} bytes, the header promised data up to {need}", path=path)
            handles.append(_register(cufile, fd, path))

        errors: list[BaseException] = []
        stop = threading.Event()
        lock = threading.Lock()
        state = {"next": 0}

        def worker() -> None:
            try:
                cd.set_current(device)
                while not stop.is_set() and not cancel.is_set():
                    with lock:
                        i = state["next"]
                        state["next"] += 1
                    if i >= len(pieces):
                        return
                    seg = pieces[i]
                    path = layout.files[seg.file]
                    done = 0
                    while done < seg.length:
                        n = int(cufile.read(handles[seg.file], bases[seg.allocation], seg.length - done,
                                            seg.file_offset + done, seg.offset + done))
                        if n < 0:
                            raise BackendError("cuFileRead", n, f"{path}: cuFileRead of {seg.length - done} bytes at "
                                                                f"{seg.file_offset + done} returned {n}")
                        if n == 0:
                            raise BadCheckpoint(f"{path}: truncated: ended at byte {seg.file_offset + done}, the "
                                                f"header promised data up to {seg.file_offset + seg.length}", path=path)
                        done += n
                    progress(seg.length)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                stop.set()

        workers = [threading.Thread(target=worker, name=f"hw-gds-{device}-{w}", daemon=True)
                   for w in range(max(1, min(threads, len(pieces))))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if errors:
            raise next((e for e in errors if isinstance(e, BadCheckpoint)), errors[0])
        if cancel.is_set():
            raise Aborted("load cancelled")
    finally:
        for h in handles:
            try:
                cufile.handle_deregister(h)
            except Exception as exc:
                log.error("cuFileHandleDeregister: %s", exc)
        for fd in fds:
            os.close(fd)
    how = "cuFile compatibility mode (forced)" if compat else "cuFile"
    notes = f"; {'; '.join(DRIVER.notes)}" if DRIVER.notes else ""
    return (f"gds: {how}, {threads} threads x {chunk // MiB}MiB reads on cuda:{device}; {len(pieces)} reads, "
            f"{direct}/{len(fds)} files O_DIRECT{notes}")
