"""The GPUDirect Storage path: cuFile reads straight from the files into the resident allocation.

cuFile comes from ``cuda.bindings.cufile`` (part of cuda-bindings; it loads ``libcufile.so``, which
the ``nvidia-cufile`` wheel that torch depends on provides). With ``/dev/nvidia-fs*`` present cuFile
DMAs storage -> GPU; without it, cuFile's *compatibility mode* reads through its own host bounce
buffers, which is only useful as a correctness check of this path (``gds="compat"`` forces it).

The backend picks this path only when ``/dev/nvidia-fs*`` exists (or when told to); it never falls
back silently: ``CudaBackend.fill`` says which path ran and why in its description and its log.

Where cuFile refuses a file. ``cuFileHandleRegister`` looks up the block device behind each file
(the device number ``fstat`` reports, then its attributes in udev) and does so in compatibility
mode too. So a file on overlayfs or tmpfs (anonymous device numbers ``0:N``, the usual ``/tmp`` of a
container), or any file in a container that does not see ``/run/udev``, cannot be registered,
whatever the compatibility settings say (what cuFile logs and returns then: docs/loader.md, GDS).
kvikio and fastsafetensors do not rely on cuFile's compatibility mode for such files either: they
fall back to their own POSIX reader. Here that reader is the bounce path (``gds=auto|off``); a
refused registration is reported as a ``BackendError`` naming the file, its filesystem and the
known obstacle, before any byte is read.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from hotweights.cuda import devices as cd
from hotweights.errors import Aborted, BackendError, BadCheckpoint
from hotweightsd.core import faults
from hotweightsd.core.layout import RankLayout
from hotweightsd.loaders.files import open_source, split

log = logging.getLogger("hotweightsd.cuda")

MiB = 1024 * 1024
MOUNTINFO = "/proc/self/mountinfo"
UDEV_DIR = "/run/udev"
LOGFILE = "/tmp/hotweights-cufile.log"
# Local filesystems cuFile registers files of in compatibility mode without nvidia-fs (cuda-python's
# own cuFile tests skip handle registration on anything else). Others may work, on newer cuFile.
KNOWN_FILESYSTEMS = ("ext4", "xfs")


def nvidia_fs_devices() -> list[str]:
    return sorted(glob.glob("/dev/nvidia-fs*"))


def cufile_module() -> Any:
    try:
        from cuda.bindings import cufile  # lazy: needs cuda-bindings >= 12.9 and libcufile.so
    except Exception as exc:
        raise BackendError(
            "import cuda.bindings.cufile",
            "unavailable",
            f"cuFile bindings cannot be imported: {type(exc).__name__}: {exc}",
        ) from exc
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


def cufile_version(cufile: Any) -> str:
    """libcufile's version as "1.15" (cuFileGetVersion answers 1000 * major + 10 * minor)."""
    try:
        v = int(cufile.get_version())
    except Exception:
        return "?"
    return f"{v // 1000}.{v % 1000 // 10}"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # mountinfo writes " " as \040


def file_storage(path: str) -> dict[str, str]:
    """Where a file lives as cuFile sees it: the device number ``stat`` reports and the mount holding it.

    Keys: ``dev`` ("major:minor"), ``fstype``, ``mount`` and ``source`` ("?" where unknown).
    """
    st = os.stat(path)
    out = {"dev": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", "fstype": "?", "mount": "?", "source": "?"}
    real = os.path.realpath(path)
    best = -1
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        # "36 35 98:0 /root /mnt rw,noatime shared:1 - ext4 /dev/sda1 rw": fields after " - " are type, source
        left, sep, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if not sep or len(a) < 5 or len(b) < 2 or a[2] != out["dev"]:
            continue
        mount = _unescape(a[4])
        # Bind mounts share a device: prefer the longest mount point above the file, else the first one.
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        rank = len(mount) if inside else 0
        if rank > best:
            best = rank
            out.update(fstype=b[0], mount=mount, source=_unescape(b[1]))
    return out


def registration_obstacles(path: str) -> list[str]:
    """Known reasons cuFile cannot register ``path`` here, or [] when none is known."""
    try:
        where = file_storage(path)
    except OSError as exc:
        return [f"it cannot be examined: {exc.strerror}"]
    out = []
    fs = f"{where['fstype']} (mounted at {where['mount']}, device {where['dev']})"
    if where["dev"].startswith("0:"):
        out.append(
            f"it is on {fs}, a filesystem without a block device; cuFile looks up the block device "
            f"of every file it registers, in compatibility mode too, and cannot for this one"
        )
    elif where["fstype"] not in KNOWN_FILESYSTEMS:
        out.append(
            f"it is on {fs}; cuFile's compatibility mode is known to register files on "
            f"{' or '.join(KNOWN_FILESYSTEMS)} only"
        )
    if not os.path.isdir(UDEV_DIR):
        out.append(
            f"{UDEV_DIR} is not visible here (a container started without it mounted), and cuFile reads "
            f"the attributes of a file's block device from it"
        )
    return out


def _bool_parameter(cufile: Any, name: str) -> int:
    """A BoolConfigParameter member by name; cuda-bindings 12.9 spelled them with a PARAM_ prefix."""
    enum = cufile.BoolConfigParameter
    member = getattr(enum, name, None) or getattr(enum, "PARAM_" + name)
    return int(member)


class CuFileDriver:
    """cuFileDriverOpen once per process; compatibility mode is chosen before the first open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened = False
        self.compat = False
        self.notes: list[str] = []
        self.logfile = LOGFILE

    def open(self, compat: bool) -> None:
        with self._lock:
            if self.opened:
                if compat and not self.compat:
                    self.notes.append("compatibility mode asked after cuFile was opened without it")
                return
            cufile = cufile_module()
            # cuFile takes its settings from its environment; a log path set by the operator stays.
            self.logfile = os.environ.setdefault("CUFILE_LOGFILE_PATH", LOGFILE)
            if compat:
                # cuFile reads its settings when the driver opens: environment variables override
                # cufile.json (an installed /etc/cufile.json may say allow_compat_mode: false), and
                # cuFileSetParameter* must come before cuFileDriverOpen. Forcing compatibility mode
                # keeps cuFile from trying nvidia-fs even where it exists: this mode is the check.
                os.environ["CUFILE_ALLOW_COMPAT_MODE"] = "true"
                os.environ["CUFILE_FORCE_COMPAT_MODE"] = "true"
                for name in ("PROPERTIES_ALLOW_COMPAT_MODE", "FORCE_COMPAT_MODE"):
                    try:
                        cufile.set_parameter_bool(_bool_parameter(cufile, name), True)
                    except Exception as exc:  # older libcufile: the environment variables still apply
                        self.notes.append(f"set {name}: {type(exc).__name__}: {exc}")
            try:
                cufile.driver_open()
            except Exception as exc:
                raise BackendError(
                    "cuFileDriverOpen",
                    getattr(exc, "status", "error"),
                    f"cuFileDriverOpen failed: {type(exc).__name__}: {exc} (cuFile's log: {self.logfile})",
                ) from exc
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


def _scalar(value: Any) -> int:
    """An int from a Descr field, which is a one-element numpy array in some cuda-bindings releases."""
    value = value.tolist() if hasattr(value, "tolist") else value
    return int(value[0] if isinstance(value, list) else value)


def _register(cufile: Any, fd: int, path: str) -> int:
    descr = cufile.Descr()  # numpy.empty underneath: every field that matters is set here
    descr.type = cufile.FileHandleType.OPAQUE_FD
    descr.handle.fd = fd
    descr.fs_ops = 0
    # The handle union is a nested field of a numpy record: make sure the write landed in the struct
    # that handle_register receives, not in a copy (a garbage fd would look like a cuFile refusal).
    got_fd, got_type = _scalar(descr.handle.fd), _scalar(descr.type)
    if got_fd != fd or got_type != int(cufile.FileHandleType.OPAQUE_FD):
        raise BackendError(
            "cuFileHandleRegister",
            "descriptor",
            f"{path}: the CUfileDescr_t built for fd {fd} reads back fd {got_fd}, type {got_type}: "
            f"this cuda-bindings' Descr does not hold what was set",
        )
    try:
        return int(cufile.handle_register(descr.ptr))
    except Exception as exc:
        obstacles = registration_obstacles(path)
        logfile = DRIVER.logfile
        try:
            where = file_storage(path)
        except OSError:
            where = {"fstype": "?", "dev": "?"}
        why = (
            "; ".join(obstacles)
            if obstacles
            else f"no known obstacle for a {where['fstype']} file on device {where['dev']}"
        )
        raise BackendError(
            "cuFileHandleRegister",
            getattr(exc, "status", "error"),
            f"{path}: cuFileHandleRegister failed: {type(exc).__name__}: {exc}. cuFile {cufile_version(cufile)} "
            f"refused the file: {why}. Load it with gds=auto or gds=off (the bounce path reads any file), or keep "
            f"GDS checkpoints on ext4/xfs on a local disk with {UDEV_DIR} visible. cuFile's log: {logfile}",
            path=path,
            filesystem=where["fstype"],
            device=where["dev"],
            known_obstacle=bool(obstacles),
        ) from exc


def fill(
    device: int,
    layout: RankLayout,
    bases: list[int],
    threads: int,
    chunk: int,
    progress: Callable[[int], None],
    cancel: threading.Event,
    compat: bool,
) -> str:
    """Reads every segment of ``layout`` with cuFileRead into the allocations at ``bases``."""
    cufile = cufile_module()
    # cuFileDriverOpen wants a current CUDA context (cuDF calls cudaFree(0) before it for this reason);
    # pushed here and popped after, so the calling thread's own context is left as it was.
    with cd.current(device):
        DRIVER.open(compat)
        return _fill(cufile, device, layout, bases, threads, chunk, progress, cancel, compat)


def _fill(
    cufile: Any,
    device: int,
    layout: RankLayout,
    bases: list[int],
    threads: int,
    chunk: int,
    progress: Callable[[int], None],
    cancel: threading.Event,
    compat: bool,
) -> str:
    pieces = list(split(layout.segments(), chunk))
    needed = [0] * len(layout.files)
    for s in layout.segments():
        needed[s.file] = max(needed[s.file], s.file_offset + s.length)
    fds: list[int] = []
    handles: list[int] = []
    direct = 0
    try:
        for source, path, need in zip(layout.inputs(), layout.files, needed):
            # nvidia-fs DMA needs O_DIRECT. Compatibility mode reads with pread into cuFile's own bounce
            # buffers and accepts a buffered fd, which also spares it this layout's unaligned offsets.
            fd, is_direct = open_source(source, not compat)
            fds.append(fd)
            direct += is_direct
            size = os.fstat(fd).st_size
            if size < need:
                raise BadCheckpoint(
                    f"{path}: truncated: {size} bytes, the header promised data up to {need}", path=path
                )
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
                    faults.hit("load.read", f"{path} at {seg.file_offset}")
                    done = 0
                    while done < seg.length:
                        want, at = seg.length - done, seg.file_offset + done
                        try:
                            n = int(cufile.read(handles[seg.file], bases[seg.allocation], want, at, seg.offset + done))
                        except Exception as exc:  # the bindings raise cuFileError for a -1 (errno) result
                            raise BackendError(
                                "cuFileRead",
                                getattr(exc, "status", "error"),
                                f"{path}: cuFileRead of {want} bytes at {at} failed: {type(exc).__name__}: {exc}",
                            ) from exc
                        if n < 0:
                            raise BackendError(
                                "cuFileRead", n, f"{path}: cuFileRead of {want} bytes at {at} returned {n}"
                            )
                        if n == 0:
                            raise BadCheckpoint(
                                f"{path}: truncated: ended at byte {at}, the header promised data "
                                f"up to {seg.file_offset + seg.length}",
                                path=path,
                            )
                        done += n
                    faults.hit("load.copy", f"{path} at {seg.file_offset}")  # cuFile's read is the copy
                    progress(seg.length)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                stop.set()

        workers = [
            threading.Thread(target=worker, name=f"hw-gds-{device}-{w}", daemon=True)
            for w in range(max(1, min(threads, len(pieces))))
        ]
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
    return (
        f"gds: {how}, {threads} threads x {chunk // MiB}MiB reads on cuda:{device}; {len(pieces)} reads, "
        f"{direct}/{len(fds)} files O_DIRECT{notes}"
    )
