"""The bounce path: file -> pinned host ring -> device, with the reads and the H2D copies overlapped.

Plan (plain functions, no CUDA, unit-tested): a rank's segments are cut by a fixed grid of
``chunk_size`` windows of each file. Each window's tensors become one large read (a ``ReadChunk``:
one contiguous file range covering several tensors, or a few ranges where the file has large
holes), and each (chunk ∩ tensor) becomes one ``Piece``: one ``cuMemcpyHtoDAsync`` from the
chunk's bytes to the tensor's place in the resident allocation. Pieces contiguous on both sides
merge into one copy. Grid windows are page- and 4 KiB-aligned, so the O_DIRECT superset of a chunk
and the pages registered in mmap mode never leave its window nor overlap another chunk.

Run: ``threads`` workers, each owning ``depth`` pinned slots, one stream and one event per slot.
A worker takes the next chunk, waits on the slot's event (the copy that last used the slot), reads
into the slot, queues the copies on its stream and records the slot's event, so its reads overlap
its own earlier copies and every other worker's. While another fill runs in the process (another
GPU loading), a worker takes a run of neighbouring chunks (``busy_chunk`` bytes of grid windows) as
one read: fewer, larger reads keep the per-chunk interpreter work of all fills together down.
Read modes:

- ``pread`` (default): buffered positional reads (page cache or tmpfs -> pinned slot).
- ``odirect``: O_DIRECT reads of the 4 KiB-aligned superset of each chunk, for cold data; the right
  sub-range is copied to the device. Files on filesystems that refuse O_DIRECT (tmpfs) are read
  buffered, and the description says so.
- ``mmap``: the file mapped read-only, each chunk's pages registered with
  ``cuMemHostRegister(READ_ONLY)`` and copied straight from the page cache (no host copy, but
  pinning costs); a registration is dropped when its copies are done. For trusted, stable files.
  Measured slower than ``pread`` (8-21 GB/s on an H100): the driver pins one call at a time, and its
  pinning stalls other threads' driver calls, so it is not mixed with the copy workers either
  (benchmarks/results/NOTES.md).

Pinned rings are allocated once per device (``DeviceRing``) and reused across loads: pinning costs
more than copying. ``hugepages`` backs the ring with transparent huge pages (anonymous memory,
``MADV_HUGEPAGE``, then ``cuMemHostRegister``) instead of ``cuMemHostAlloc``'s memory; ``sync=block``
makes a worker that waits for its slot sleep (``CU_EVENT_BLOCKING_SYNC``) rather than spin, which
matters when the workers outnumber the cores. Neither showed a gain beyond run-to-run noise, so both
are off by default. Where the node has several NUMA nodes the ring is allocated, and the readers
run, on the CPUs of the GPU's node (best effort).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hotweights.cuda import devices as cd
from hotweights.errors import Aborted, BackendError, BadCheckpoint, InvalidArgument
from hotweightsd.core.layout import RankLayout, Segment
from hotweightsd.loaders import native
from hotweightsd.loaders.files import read_exact

log = logging.getLogger("hotweightsd.cuda")

MiB = 1024 * 1024
DIRECT_ALIGN = 4096
PAGE = mmap.PAGESIZE
READ_MODES = ("pread", "odirect", "mmap")
SYNC_MODES = ("spin", "block")
ENGINES = ("auto", "native", "python")
# From the sweeps (benchmarks/results/sweep-*.json): one GPU loading, 12-16 workers reading 4 MiB chunks
# beat 16-24 workers reading 16 MiB by 10-20% from page cache and tmpfs (H100 and H200). Two GPUs
# loading at once in one process with 16 workers each, 16 MiB reads won by far (54 against 33 GB/s):
# every chunk costs a few interpreter-bound calls, so the chunk rate of all fills together must stay
# low. A fill therefore reads runs of neighbouring chunks up to ``busy_chunk`` while another fill runs
# (a later session: 48 GB/s so, 50 with 8 workers x 4 MiB; one process tops out near there).
# Sixteen workers on a 16-core H100 VM collapsed to 13-25 GB/s with 4 MiB chunks on one instance, where
# 12 and 8 kept 25-33 (ab-slot-*.json): leave a few cores to the driver and the kernel.
DEFAULT_THREADS = 16
SPARE_CORES = 4
# Two H200s loading at once on a 32-core VM, readers per GPU -> GB/s for both: 16 -> 54.5, 14 -> 63.5,
# 12 -> 67.5-72.0, 10 -> 72.9-74.4, 8 -> 68.3, 6 -> 53.0 (ab-nvidia-h200-20261123-232740.json, -233103.json);
# one GPU alone is flat from 8 to 16. Native fills running at once therefore split three quarters of the
# cores less the spare ones (10 each there).
SHARED_FRACTION = 0.75
MIN_SHARED_THREADS = 4
DEFAULT_CHUNK = 4 * MiB
DEFAULT_BUSY_CHUNK = 16 * MiB
DEFAULT_DEPTH = 2
DEFAULT_SYNC = "spin"
DEFAULT_HUGEPAGES = False
HUGE = 2 * MiB
MAX_GAP = 1 * MiB  # a hole up to this size inside a window is read through rather than split around


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_HUGEPAGE = 14
_MAP_FAILED = ctypes.c_void_p(-1).value


# --- plan (pure) ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One H2D copy: ``length`` bytes from ``src`` (relative to the chunk's file offset) to (allocation, offset)."""

    src: int
    allocation: int
    offset: int
    length: int


@dataclass(frozen=True)
class ReadChunk:
    """One read: ``length`` bytes of file ``file`` from ``offset``, and the copies out of it."""

    file: int
    offset: int
    length: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Bytes that reach the device (the read may also cover small holes)."""
        return sum(p.length for p in self.pieces)

    def direct_span(self, align: int = DIRECT_ALIGN) -> tuple[int, int, int]:
        """(aligned start, aligned length, skip): the O_DIRECT read that covers this chunk."""
        start = self.offset // align * align
        end = -(-(self.offset + self.length) // align) * align
        return start, end - start, self.offset - start


def plan_chunks(
    segments: Iterable[Segment], chunk_size: int = DEFAULT_CHUNK, max_gap: int = MAX_GAP
) -> list[ReadChunk]:
    """Cuts segments by a grid of ``chunk_size`` windows per file into reads and copies.

    ``chunk_size`` must be a multiple of 4096 (so windows are page- and O_DIRECT-aligned).
    Chunks come out in file order, file by file.
    """
    if chunk_size <= 0 or chunk_size % DIRECT_ALIGN:
        raise InvalidArgument(f"chunk size {chunk_size} is not a positive multiple of {DIRECT_ALIGN}")
    out: list[ReadChunk] = []
    cur: dict[str, Any] | None = None  # file, window, start, end, pieces

    def flush() -> None:
        nonlocal cur
        if cur is not None and cur["pieces"]:
            out.append(ReadChunk(cur["file"], cur["start"], cur["end"] - cur["start"], tuple(cur["pieces"])))
        cur = None

    for s in sorted(segments, key=lambda s: (s.file, s.file_offset)):
        done = 0
        while done < s.length:
            pos = s.file_offset + done
            window = pos // chunk_size
            n = min(s.length - done, (window + 1) * chunk_size - pos)
            if cur is not None and (
                cur["file"] != s.file or cur["window"] != window or pos < cur["end"] or pos - cur["end"] > max_gap
            ):
                flush()
            if cur is None:
                cur = {"file": s.file, "window": window, "start": pos, "end": pos, "pieces": []}
            piece = Piece(pos - cur["start"], s.allocation, s.offset + done, n)
            pieces = cur["pieces"]
            last = pieces[-1] if pieces else None
            if (
                last is not None
                and last.allocation == piece.allocation
                and last.src + last.length == piece.src
                and last.offset + last.length == piece.offset
            ):
                pieces[-1] = Piece(last.src, last.allocation, last.offset, last.length + n)
            else:
                pieces.append(piece)
            cur["end"] = pos + n
            done += n
    flush()
    return out


def run_end(chunks: Sequence[ReadChunk], i: int, chunk_size: int, limit: int, max_gap: int = MAX_GAP) -> int:
    """End (exclusive) of the run of neighbouring chunks from ``i``: one file, in order, small gaps, and
    all inside ``limit`` bytes of grid windows from the first chunk's window (so an O_DIRECT superset
    or a page registration of the run stays inside the run's own windows)."""
    first = chunks[i]
    window = first.offset // chunk_size * chunk_size
    j = i + 1
    while j < len(chunks):
        c, end = chunks[j], chunks[j - 1].offset + chunks[j - 1].length
        if c.file != first.file or c.offset < end or c.offset - end > max_gap or c.offset + c.length - window > limit:
            break
        j += 1
    return j


def merge_chunks(run: Sequence[ReadChunk]) -> ReadChunk:
    """Neighbouring chunks of one file (in file order) as one read; copies contiguous on both sides merge."""
    first = run[0]
    if len(run) == 1:
        return first
    pieces: list[Piece] = []
    for c in run:
        shift = c.offset - first.offset
        for p in c.pieces:
            last = pieces[-1] if pieces else None
            if (
                last is not None
                and last.allocation == p.allocation
                and last.src + last.length == p.src + shift
                and last.offset + last.length == p.offset
            ):
                pieces[-1] = Piece(last.src, last.allocation, last.offset, last.length + p.length)
            else:
                pieces.append(Piece(p.src + shift, p.allocation, p.offset, p.length))
    end = run[-1].offset + run[-1].length
    return ReadChunk(first.file, first.offset, end - first.offset, tuple(pieces))


def check_plan(chunks: Sequence[ReadChunk], allocation_sizes: Sequence[int]) -> None:
    """Every copy lands inside its allocation (a wrong layout must fail before any DMA)."""
    for c in chunks:
        for p in c.pieces:
            if (
                p.allocation >= len(allocation_sizes)
                or p.offset < 0
                or p.offset + p.length > allocation_sizes[p.allocation]
                or p.src + p.length > c.length
            ):
                raise InvalidArgument(
                    f"copy {p} of chunk at file {c.file} offset {c.offset} falls outside "
                    f"its allocation (sizes {list(allocation_sizes)})"
                )


def needed_file_sizes(chunks: Sequence[ReadChunk], nfiles: int) -> list[int]:
    ends = [0] * nfiles
    for c in chunks:
        ends[c.file] = max(ends[c.file], c.offset + c.length)
    return ends


# --- settings -----------------------------------------------------------------------------------------


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) or 4


def default_threads(cores: int | None = None) -> int:
    return max(4, min(DEFAULT_THREADS, (cores or _usable_cores()) - SPARE_CORES))


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    return int(v) if v else None


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name, "").strip().lower()
    return default if not v else v not in ("0", "off", "false", "no")


@dataclass(frozen=True)
class BounceSettings:
    read_mode: str = "pread"
    threads: int = DEFAULT_THREADS
    chunk_size: int = DEFAULT_CHUNK
    depth: int = DEFAULT_DEPTH
    numa: bool = True
    sync: str = DEFAULT_SYNC
    hugepages: bool = DEFAULT_HUGEPAGES
    busy_chunk: int = DEFAULT_BUSY_CHUNK
    engine: str = "auto"
    share: bool = True  # native fills running at once split the cores (fill_threads)

    @classmethod
    def resolve(
        cls,
        read_mode: str | None = None,
        threads: int | None = None,
        chunk_size: int | None = None,
        depth: int | None = None,
        numa: bool | None = None,
        sync: str | None = None,
        hugepages: bool | None = None,
        busy_chunk: int | None = None,
        engine: str | None = None,
        share: bool | None = None,
    ) -> BounceSettings:
        """Explicit values win, then ``HOTWEIGHTS_CUDA_READ_MODE`` / ``_THREADS`` / ``_CHUNK_MB`` /
        ``_RING_DEPTH`` / ``_NUMA`` / ``_SYNC`` / ``_HUGEPAGES`` / ``_BUSY_CHUNK_MB`` / ``_ENGINE`` /
        ``_SHARE_CORES``, then the defaults. ``busy_chunk`` below ``chunk_size`` means no merging."""
        mode = (read_mode or os.environ.get("HOTWEIGHTS_CUDA_READ_MODE") or "pread").strip().lower()
        if mode not in READ_MODES:
            raise InvalidArgument(f"unknown read mode {mode!r} (choose {', '.join(READ_MODES)})")
        env_chunk = _env_int("HOTWEIGHTS_CUDA_CHUNK_MB")
        chunk = chunk_size or (env_chunk * MiB if env_chunk else DEFAULT_CHUNK)
        threads = threads or _env_int("HOTWEIGHTS_CUDA_THREADS") or default_threads()
        depth = depth or _env_int("HOTWEIGHTS_CUDA_RING_DEPTH") or DEFAULT_DEPTH
        if numa is None:
            numa = _env_flag("HOTWEIGHTS_CUDA_NUMA", True)
        sync = (sync or os.environ.get("HOTWEIGHTS_CUDA_SYNC") or DEFAULT_SYNC).strip().lower()
        if sync not in SYNC_MODES:
            raise InvalidArgument(f"unknown sync mode {sync!r} (choose {', '.join(SYNC_MODES)})")
        if hugepages is None:
            hugepages = _env_flag("HOTWEIGHTS_CUDA_HUGEPAGES", DEFAULT_HUGEPAGES)
        if chunk % DIRECT_ALIGN or chunk < DIRECT_ALIGN:
            raise InvalidArgument(f"chunk size {chunk} is not a positive multiple of {DIRECT_ALIGN}")
        env_busy = _env_int("HOTWEIGHTS_CUDA_BUSY_CHUNK_MB")
        busy = busy_chunk or (env_busy * MiB if env_busy else DEFAULT_BUSY_CHUNK)
        busy = max(chunk, busy // chunk * chunk)  # whole grid windows
        if threads < 1 or depth < 1:
            raise InvalidArgument(f"threads ({threads}) and ring depth ({depth}) must be at least 1")
        engine = (engine or os.environ.get("HOTWEIGHTS_CUDA_ENGINE") or "auto").strip().lower()
        if engine not in ENGINES:
            raise InvalidArgument(f"unknown loader engine {engine!r} (choose {', '.join(ENGINES)})")
        if share is None:
            share = _env_flag("HOTWEIGHTS_CUDA_SHARE_CORES", True)
        return cls(mode, threads, chunk, depth, numa, sync, bool(hugepages), busy, engine, bool(share))

    @property
    def slot_size(self) -> int:
        """A ring slot holds one read: one chunk on the native engine, a run of chunks (``busy_chunk``) on the
        python workers (runs are their remedy for interpreter time; a smaller ring also stays warmer in the
        CPU caches)."""
        return self.chunk_size if choose_engine(self)[0] == "native" else max(self.chunk_size, self.busy_chunk)

    def describe(self, engine: str = "python", threads: int | None = None) -> str:
        """The settings as the load result reports them; ``engine`` and ``threads`` are what ran."""
        extra = (", blocking sync" if self.sync == "block" else "") + (", huge pages" if self.hugepages else "")
        busy = ""
        if engine == "python" and self.busy_chunk > self.chunk_size:
            busy = f" ({_size(self.busy_chunk)} while other fills run)"
        if engine == "native":
            extra += ", native engine"
        if threads is not None and threads != self.threads:
            extra += f" (ring of {self.threads}: fills ran at once)"
        ring = f"{threads or self.threads} threads x {self.depth} x {_size(self.chunk_size)}"
        return f"{self.read_mode} ring {ring}{busy}{extra}"


def _size(n: int) -> str:
    return f"{n // MiB}MiB" if n % MiB == 0 else f"{n // 1024}KiB"


# --- pinned ring, per device ----------------------------------------------------------------------------


def _run_on_cpus(cpus: list[int], fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` in a helper thread bound to ``cpus`` (first-touch places its pages on their node)."""
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
    """Per-device loader state kept across loads: pinned slots, one stream per worker, one event per slot."""

    def __init__(self, device: int, settings: BounceSettings) -> None:
        self.device = device
        self.threads = settings.threads
        self.depth = settings.depth
        self.slot_size = settings.slot_size
        self.pinned = settings.read_mode != "mmap"
        self.sync = settings.sync
        self.hugepages = settings.hugepages and self.pinned
        self.node, self.cpus = cd.numa_cpus(device) if settings.numa else (None, [])
        self.host_ptr = 0
        self.host_bytes = 0
        self._mapped = 0  # bytes mmapped for the huge-page ring (registered, not cuMemHostAlloc'd)
        self.streams: list[Any] = []
        self.events: list[list[Any]] = []
        self._views: list[memoryview] = []
        self.lock = threading.Lock()  # one fill at a time per device
        try:
            with cd.current(device) as drv:
                if self.pinned:
                    total = self.threads * self.depth * self.slot_size
                    self.host_ptr = _run_on_cpus(self.cpus, lambda: self._alloc_host(drv, total))
                    self.host_bytes = total
                    if self.host_ptr % DIRECT_ALIGN:
                        raise BackendError(
                            "cuMemHostAlloc",
                            "alignment",
                            f"pinned memory at {self.host_ptr:#x} is not {DIRECT_ALIGN}-byte aligned",
                        )
                    buf = (ctypes.c_char * total).from_address(self.host_ptr)
                    whole = memoryview(buf).cast("B")
                    self._views = [
                        whole[i * self.slot_size : (i + 1) * self.slot_size] for i in range(self.threads * self.depth)
                    ]
                sflag = int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
                eflag = int(drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
                if self.sync == "block":
                    eflag |= int(drv.CUevent_flags.CU_EVENT_BLOCKING_SYNC)
                for _ in range(self.threads):
                    self.streams.append(cd.check(drv.cuStreamCreate(sflag), "cuStreamCreate"))
                    self.events.append([cd.check(drv.cuEventCreate(eflag), "cuEventCreate") for _ in range(self.depth)])
        except BaseException:
            self.close()
            raise

    def _alloc_host(self, drv: Any, total: int) -> int:
        """Pinned memory for the ring, allocated by the calling thread (first touch places it on its node)."""
        with cd.current(self.device):
            if not self.hugepages:
                flags = int(drv.CU_MEMHOSTALLOC_PORTABLE)
                return int(cd.check(drv.cuMemHostAlloc(total, flags), "cuMemHostAlloc", bytes=total))
            size = -(-total // HUGE) * HUGE
            # Over-map by one huge page so the ring can start on a 2 MiB boundary (THP needs it).
            span = size + HUGE
            raw = _libc.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            if raw in (None, _MAP_FAILED):
                e = ctypes.get_errno()
                raise BackendError("mmap", e, f"cannot map {span} bytes for the pinned ring: {os.strerror(e)}")
            base = -(-raw // HUGE) * HUGE
            if base > raw:
                _libc.munmap(raw, base - raw)
            if raw + span > base + size:
                _libc.munmap(base + size, raw + span - base - size)
            _libc.madvise(base, size, MADV_HUGEPAGE)  # best effort: THP may be off ("never")
            ctypes.memset(base, 0, size)  # first touch, on this thread's node
            try:
                cd.check(
                    drv.cuMemHostRegister(base, size, int(drv.CU_MEMHOSTREGISTER_PORTABLE)),
                    "cuMemHostRegister",
                    bytes=size,
                )
            except BaseException:
                _libc.munmap(base, size)
                raise
            self._mapped = size
            return base

    def fits(self, settings: BounceSettings) -> bool:
        same = (self.threads, self.depth, self.slot_size, self.sync) == (
            settings.threads,
            settings.depth,
            settings.slot_size,
            settings.sync,
        )
        return (
            same
            and self.hugepages == (settings.hugepages and self.pinned)
            and (self.pinned or settings.read_mode == "mmap")
        )

    def slot(self, worker: int, k: int) -> tuple[int, memoryview]:
        i = worker * self.depth + k
        return self.host_ptr + i * self.slot_size, self._views[i]

    def describe_numa(self) -> str:
        return f", NUMA node {self.node} ({len(self.cpus)} cpus)" if self.node is not None and self.cpus else ""

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
                if self.host_ptr and self._mapped:
                    errors += _collect(lambda: cd.check(drv.cuMemHostUnregister(self.host_ptr), "cuMemHostUnregister"))
                    _libc.munmap(self.host_ptr, self._mapped)
                elif self.host_ptr:
                    errors += _collect(lambda: cd.check(drv.cuMemFreeHost(self.host_ptr), "cuMemFreeHost"))
        except Exception as exc:
            errors.append(exc)
        self.events, self.streams, self.host_ptr, self.host_bytes, self._mapped = [], [], 0, 0, 0
        for e in errors:
            log.error("releasing the pinned ring of cuda:%d: %s", self.device, e)


def _collect(fn: Callable[[], Any]) -> list[Exception]:
    try:
        fn()
    except Exception as exc:
        return [exc]
    return []


# --- files --------------------------------------------------------------------------------------------


@dataclass
class SourceFiles:
    """A layout's files opened for one fill (and mapped, in mmap mode); closed by ``close()``."""

    paths: list[str]
    fds: list[int] = field(default_factory=list)
    direct: list[bool] = field(default_factory=list)
    maps: list[tuple[int, int]] = field(default_factory=list)  # (address, length)

    @classmethod
    def open(cls, paths: list[str], mode: str, needed: list[int]) -> SourceFiles:
        files = cls(list(paths))
        try:
            for path, need in zip(paths, needed):
                fd, direct = open_source(path, mode == "odirect")
                files.fds.append(fd)
                files.direct.append(direct)
                size = os.fstat(fd).st_size
                if size < need:
                    raise BadCheckpoint(
                        f"{path}: truncated: {size} bytes, the header promised data up to {need}", path=path
                    )
                if mode == "mmap":
                    addr = _libc.mmap(None, max(size, 1), mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                    if addr in (None, _MAP_FAILED):
                        e = ctypes.get_errno()
                        raise BackendError("mmap", e, f"{path}: mmap failed: {os.strerror(e)}")
                    files.maps.append((addr, max(size, 1)))
        except BaseException:
            files.close()
            raise
        return files

    @property
    def buffered_fallbacks(self) -> int:
        return sum(1 for d in self.direct if not d)

    def close(self) -> None:
        for addr, length in self.maps:
            _libc.munmap(addr, length)
        self.maps = []
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def open_source(path: str, direct: bool) -> tuple[int, bool]:
    flags = os.O_RDONLY | os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise BadCheckpoint(f"{path}: cannot open: {exc.strerror}", path=path) from exc
            log.info("%s: O_DIRECT refused by its filesystem; reading it buffered", path)
    try:
        return os.open(path, flags), False
    except OSError as exc:
        raise BadCheckpoint(f"{path}: cannot open: {exc.strerror}", path=path) from exc


def read_direct(fd: int, buf: memoryview, chunk: ReadChunk, path: str) -> int:
    """Reads the aligned superset of ``chunk`` into ``buf``; returns where the chunk starts in ``buf``."""
    start, length, skip = chunk.direct_span()
    need = skip + chunk.length
    got = 0
    while got < length:
        try:
            n = os.preadv(fd, [buf[got:length]], start + got)
        except OSError as exc:
            raise BackendError(
                "pread(O_DIRECT)",
                exc.errno or "os",
                f"{path}: O_DIRECT read of {length - got} bytes at {start + got} failed: "
                f"{exc.strerror} (set HOTWEIGHTS_CUDA_READ_MODE=pread to read buffered)",
            ) from exc
        if n == 0:
            break
        got += n
        if n % DIRECT_ALIGN:
            break  # end of file inside this block
    if got < need:
        raise BadCheckpoint(
            f"{path}: truncated: ended at byte {start + got}, the header promised data up to "
            f"{chunk.offset + chunk.length}",
            path=path,
        )
    return skip


# --- the fill -----------------------------------------------------------------------------------------


class _Fill:
    def __init__(
        self,
        device: int,
        ring: DeviceRing,
        settings: BounceSettings,
        chunks: list[ReadChunk],
        files: SourceFiles,
        bases: list[int],
        progress: Callable[[int], None],
        cancel: threading.Event,
    ) -> None:
        self.device = device
        self.ring = ring
        self.settings = settings
        self.chunks = chunks
        self.files = files
        self.bases = bases
        self.progress = progress
        self.cancel = cancel
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._next = 0
        self._lock = threading.Lock()
        self.reads = self.copies = self.merged = 0

    def take(self) -> ReadChunk | None:
        """The next chunk; while other fills run, the next run of neighbouring chunks as one read."""
        with self._lock:
            if self._next >= len(self.chunks) or self.stop.is_set() or self.cancel.is_set():
                return None
            i = self._next
            if self.settings.busy_chunk <= self.settings.chunk_size or _active_fills() < 2:
                self._next += 1
                chunk = self.chunks[i]
            else:
                self._next = run_end(self.chunks, i, self.settings.chunk_size, self.settings.busy_chunk)
                self.merged += self._next - i > 1
                chunk = merge_chunks(self.chunks[i : self._next])
            # Counted here, under the lock already held: a fill that returns has finished every chunk taken.
            self.reads += 1
            self.copies += len(chunk.pieces)
            return chunk

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)
        self.stop.set()

    def run(self) -> None:
        workers = [
            threading.Thread(target=self.worker, args=(w,), name=f"hw-h2d-{self.device}-{w}", daemon=True)
            for w in range(min(self.ring.threads, max(1, len(self.chunks))))
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def worker(self, w: int) -> None:
        drv = None
        stream = self.ring.streams[w] if w < len(self.ring.streams) else None
        events = self.ring.events[w] if w < len(self.ring.events) else []
        pending: list[Any] = [None] * self.ring.depth  # per slot: None, True (copies queued) or a registration
        try:
            drv = cd.init()
            cd.set_current(self.device)
            if self.ring.cpus:
                try:
                    os.sched_setaffinity(0, self.ring.cpus)
                except OSError:
                    pass
            k = 0
            while True:
                chunk = self.take()
                if chunk is None:
                    break
                s = k % self.ring.depth
                k += 1
                if pending[s] is not None:
                    cd.check(drv.cuEventSynchronize(events[s]), "cuEventSynchronize")
                    self._retire(drv, pending[s])
                    pending[s] = None
                src = self._read(drv, w, s, chunk)
                if isinstance(src, tuple):  # mmap: (registered address, length, chunk start address)
                    pending[s] = src
                    src_ptr = src[2]
                else:
                    pending[s] = True
                    src_ptr = src
                for p in chunk.pieces:
                    cd.check(
                        drv.cuMemcpyHtoDAsync(self.bases[p.allocation] + p.offset, src_ptr + p.src, p.length, stream),
                        "cuMemcpyHtoDAsync",
                        bytes=p.length,
                    )
                cd.check(drv.cuEventRecord(events[s], stream), "cuEventRecord")
                self.progress(chunk.nbytes)
        except BaseException as exc:
            self.fail(exc)
        finally:
            # Whatever happened, no copy may still be in flight when the fill returns.
            if drv is not None and stream is not None:
                try:
                    cd.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
                except BaseException as exc:
                    self.fail(exc)
                for token in pending:
                    if token is not None:
                        try:
                            self._retire(drv, token)
                        except BaseException as exc:
                            self.fail(exc)

    def _read(self, drv: Any, w: int, s: int, chunk: ReadChunk) -> Any:
        mode = self.settings.read_mode
        fd, path = self.files.fds[chunk.file], self.files.paths[chunk.file]
        if mode == "mmap":
            addr, _ = self.files.maps[chunk.file]
            lo = (chunk.offset // PAGE) * PAGE
            hi = -(-(chunk.offset + chunk.length) // PAGE) * PAGE
            flags = int(drv.CU_MEMHOSTREGISTER_READ_ONLY)
            cd.check(
                drv.cuMemHostRegister(addr + lo, hi - lo, flags),
                "cuMemHostRegister(READ_ONLY)",
                path=path,
                offset=lo,
                bytes=hi - lo,
            )
            return (addr + lo, hi - lo, addr + chunk.offset)
        ptr, view = self.ring.slot(w, s)
        if mode == "odirect":
            return ptr + read_direct(fd, view, chunk, path)
        read_exact(fd, view[: chunk.length], chunk.offset, path)
        return ptr

    @staticmethod
    def _retire(drv: Any, token: Any) -> None:
        if isinstance(token, tuple):
            cd.check(drv.cuMemHostUnregister(token[0]), "cuMemHostUnregister")


_active = [0]  # fills running in this process, all devices
_active_lock = threading.Lock()


_expected = [0]  # ranks announced by concurrent_fills(): they start together, so counting starts would race


def _active_fills() -> int:
    return _active[0]


@contextmanager
def concurrent_fills(count: int) -> Iterator[None]:
    """Announces ``count`` fills about to run at once (a model's ranks), so the first to start already
    knows it shares the host (fill_threads)."""
    with _active_lock:
        _expected[0] += count
    try:
        yield
    finally:
        with _active_lock:
            _expected[0] -= count


def fill_threads(settings: BounceSettings, ring_threads: int, concurrent: int, cores: int | None = None) -> int:
    """Readers for one native fill: all of its ring's alone; with ``concurrent`` fills at once, an equal
    share of SHARED_FRACTION of the cores less the spare ones (at least MIN_SHARED_THREADS, at most the
    ring's)."""
    if not settings.share or concurrent <= 1:
        return ring_threads
    share = int(((cores or _usable_cores()) - SPARE_CORES) * SHARED_FRACTION) // concurrent
    return max(min(MIN_SHARED_THREADS, ring_threads), min(ring_threads, share))


def choose_engine(settings: BounceSettings) -> tuple[str, str]:
    """("native" | "python", why), ``why`` as the load's description ends with it ("python workers...").
    ``engine=native`` that cannot run is an error, never a silent fallback."""
    if settings.engine == "python":
        return "python", "python workers by configuration"
    if settings.read_mode == "mmap":
        reason = "mmap mode has no native engine"
    elif settings.read_mode == "odirect" and settings.engine == "auto":
        # Cold loads are disk-bound (a few hundred chunks a second: no interpreter limit), and the python
        # workers read them 7-8% faster than the native loop in the same runs, for reasons not pinned down
        # (issuing the reads in chunk order did not close the gap): benchmarks/results/NOTES.md.
        return "python", "python workers for O_DIRECT reads (measured faster cold)"
    elif getattr(cd.driver(), "__name__", "") != "cuda.bindings.driver":
        reason = "not the CUDA driver (a test double)"
    else:
        reason = native.unavailable_reason() or ""
    if not reason:
        return "native", "native engine"
    if settings.engine == "native":
        raise BackendError("native loader", "unavailable", f"the native loader engine was asked for, but {reason}")
    return "python", f"python workers: {reason}"


def fill(
    device: int,
    ring: DeviceRing,
    settings: BounceSettings,
    layout: RankLayout,
    bases: list[int],
    sizes: list[int],
    progress: Callable[[int], None],
    cancel: threading.Event,
) -> str:
    """Copies every segment of ``layout`` into the device allocations at ``bases``; returns a description.

    Raises BadCheckpoint (a file shorter than its header promised), Aborted (``cancel`` set), or the
    first CudaError/BackendError a worker hit. Every queued copy has finished when it returns or raises.
    """
    engine, why = choose_engine(settings)
    chunks = plan_chunks(layout.segments(), settings.chunk_size)
    check_plan(chunks, sizes)
    files = SourceFiles.open(layout.files, settings.read_mode, needed_file_sizes(chunks, len(layout.files)))
    extra = ""
    with _active_lock:
        _active[0] += 1
        concurrent = max(_active[0], _expected[0])
    threads = fill_threads(settings, ring.threads, concurrent) if engine == "native" else ring.threads
    try:
        if engine == "native":
            reads, copies = native.fill(
                chunks,
                files.fds,
                files.direct,
                files.paths,
                bases,
                threads=threads,
                depth=ring.depth,
                slot_size=ring.slot_size,
                host_base=ring.host_ptr,
                progress=progress,
                cancel=cancel,
                context=int(cd.primary_context(device)),
                streams=[int(s) for s in ring.streams],
                events=[int(e) for evs in ring.events for e in evs],
                cpus=ring.cpus,
            )
        else:
            job = _Fill(device, ring, settings, chunks, files, bases, progress, cancel)
            job.run()
            if job.errors:
                raise next((e for e in job.errors if isinstance(e, BadCheckpoint)), job.errors[0])
            if cancel.is_set():
                raise Aborted("load cancelled")
            reads, copies = job.reads, job.copies
            extra = f" ({job.merged} of them runs of chunks: other fills ran)" if job.merged else ""
    finally:
        with _active_lock:
            _active[0] -= 1
        files.close()
    if settings.read_mode == "odirect" and files.buffered_fallbacks:
        extra += f"; O_DIRECT refused for {files.buffered_fallbacks} file(s) (tmpfs?), read buffered"
    why = "" if engine == "native" else f"; {why}"
    return (
        f"{settings.describe(engine, threads)} on cuda:{device}{ring.describe_numa()}; "
        f"{reads} reads{extra}, {copies} copies{why}"
    )
