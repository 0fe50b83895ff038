"""The bounce path's native engine: ``hwfill.c`` through ctypes.

The plan (``plan.plan_chunks``), the ring, the streams and the events stay Python's; only the loop
over chunks (read into a slot, queue its copies, record the slot's event) runs in C threads, with
the GIL released for the whole fill. ``pip install`` builds the library beside this module
(setup.py; a C compiler is required where one exists); ``LoaderSettings.native_lib`` may name another.

``host_mode`` runs the same loop with ``memcpy`` into host memory and no driver calls: the unit tests
and CI run the engine's reads, planning, truncation, cancellation and error paths with it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from hotweights.cuda.driver import error_name
from hotweights.errors import Aborted, BackendError, BadCheckpoint, CudaError
from hotweightsd.core import faults
from hotweightsd.loaders.files import DIRECT_HINT
from hotweightsd.loaders.settings import MAX_DEPTH, MAX_THREADS

ABI = 7
ERR_CUDA, ERR_OS, ERR_TRUNCATED, ERR_CANCELLED, ERR_SETUP, ERR_INJECTED = 1, 2, 3, 4, 5, 6
POLL_S = 0.02  # progress and cancel are looked at this often while the fill runs


class Chunk(ctypes.Structure):
    _fields_ = [
        ("offset", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("first_piece", ctypes.c_int64),
        ("file", ctypes.c_int32),
        ("npieces", ctypes.c_int32),
        ("source", ctypes.c_int32),
        ("pad", ctypes.c_int32),
    ]


class Piece(ctypes.Structure):
    _fields_ = [("src", ctypes.c_int64), ("dst", ctypes.c_uint64), ("length", ctypes.c_int64)]


class Job(ctypes.Structure):
    _fields_ = [
        ("fds", ctypes.POINTER(ctypes.c_int32)),
        ("direct", ctypes.POINTER(ctypes.c_uint8)),
        ("chunks", ctypes.POINTER(Chunk)),
        ("pieces", ctypes.POINTER(Piece)),
        ("nchunks", ctypes.c_int64),
        ("npieces", ctypes.c_int64),
        ("nsources", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("depth", ctypes.c_int32),
        ("host_mode", ctypes.c_int32),
        ("slot_size", ctypes.c_int64),
        ("host_base", ctypes.c_uint64),
        ("context", ctypes.c_uint64),
        ("streams", ctypes.POINTER(ctypes.c_uint64)),
        ("events", ctypes.POINTER(ctypes.c_uint64)),
        ("cpus", ctypes.POINTER(ctypes.c_int32)),
        ("ncpus", ctypes.c_int32),
        ("cancel", ctypes.c_int32),
        ("next", ctypes.c_int64),
        ("done_bytes", ctypes.c_int64),
        ("reads", ctypes.c_int64),
        ("copies", ctypes.c_int64),
        ("err_kind", ctypes.c_int32),
        ("err_code", ctypes.c_int32),
        ("err_chunk", ctypes.c_int64),
        ("err_file", ctypes.c_int64),
        ("err_offset", ctypes.c_int64),
        ("err_op", ctypes.c_char * 48),
        ("fault_chunk", ctypes.c_int64),
        ("fault_stage", ctypes.c_int32),
        ("direct_request", ctypes.c_int64),
        ("direct_grid", ctypes.c_int64),
        ("wall_ns", ctypes.c_int64),
        ("setup_ns", ctypes.c_int64),
        ("read_ns", ctypes.c_int64),
        ("wait_ns", ctypes.c_int64),
        ("queue_ns", ctypes.c_int64),
        ("drain_ns", ctypes.c_int64),
        ("spread_ns", ctypes.c_int64),
    ]


class Filled(NamedTuple):
    """What a native fill did, and where its time went: seconds, the readers' own summed over them."""

    reads: int
    copies: int
    threads: int = 0
    wall: float = 0.0  # the engine's call, from its start to the last reader joined
    setup: float = 0.0  # before the last reader started (the re-cut among it)
    reading: float = 0.0
    waiting: float = 0.0  # for a slot's earlier copies before reading into it
    queueing: float = 0.0  # copies and events queued (memcpy on the host)
    draining: float = 0.0  # the last wait for each reader's copies
    tail: float = 0.0  # from the first reader's end to the last's
    planned: float = 0.0  # the caller's side before the engine started (its plan, the pack for C), when given

    @classmethod
    def of(cls, job: Job, planned: float = 0.0) -> Filled:
        return cls(
            job.reads,
            job.copies,
            job.threads,
            planned=planned,
            wall=job.wall_ns / 1e9,
            setup=job.setup_ns / 1e9,
            reading=job.read_ns / 1e9,
            waiting=job.wait_ns / 1e9,
            queueing=job.queue_ns / 1e9,
            draining=job.drain_ns / 1e9,
            tail=job.spread_ns / 1e9,
        )

    def describe(self) -> str:
        """One clause for a load's description: a disk-bound fill reads nearly all of its readers' time;
        time spent waiting, queueing or draining is the copies' share, and a long tail one reader's slow
        last read."""
        span = self.threads * self.wall
        if span <= 0:
            return ""

        def pct(x: float) -> str:
            return f"{100 * x / span:.0f}%"

        planned = f"planned in {1e3 * self.planned:.1f} ms, " if self.planned > 0 else ""
        return (
            f"{planned}readers {pct(self.reading)} reading, {pct(self.waiting)} waiting on copies, "
            f"{pct(self.queueing)} queueing them, {pct(self.draining)} draining them at the end over "
            f"{self.wall:.3f} s (started after {1e3 * self.setup:.1f} ms, the last done {1e3 * self.tail:.1f} ms "
            "after the first)"
        )


_loaded: dict[str, tuple[ctypes.CDLL | None, str | None]] = {}  # library asked for -> (library, why not)
_load_lock = threading.Lock()


def library_path(explicit: str = "") -> str | None:
    """``explicit`` when given, else the library built beside this module, else None."""
    if explicit:
        return explicit
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_hwfill*.so")))
    return found[0] if found else None


def _load(explicit: str = "") -> tuple[ctypes.CDLL | None, str | None]:
    with _load_lock:
        if explicit not in _loaded:
            _loaded[explicit] = _open(library_path(explicit))
        return _loaded[explicit]


def _open(path: str | None) -> tuple[ctypes.CDLL | None, str | None]:
    if path is None:
        return None, "native loader not built (no C compiler at install time?)"
    try:
        lib = ctypes.CDLL(path)
        lib.hw_abi.restype = ctypes.c_int
        lib.hw_job_size.restype = ctypes.c_size_t
        lib.hw_fill.restype = ctypes.c_int
        lib.hw_fill.argtypes = [ctypes.POINTER(Job)]
    except (OSError, AttributeError) as exc:
        return None, f"native loader {path} does not load: {exc}"
    if lib.hw_abi() != ABI or lib.hw_job_size() != ctypes.sizeof(Job):
        return None, (
            f"native loader {path} is from another revision (ABI {lib.hw_abi()}, job size "
            f"{lib.hw_job_size()}; this code expects {ABI}, {ctypes.sizeof(Job)}): rebuild it"
        )
    lib.hw_max_threads.restype = lib.hw_max_depth.restype = ctypes.c_int
    limits = (lib.hw_max_threads(), lib.hw_max_depth())
    if limits != (MAX_THREADS, MAX_DEPTH):
        return None, (
            f"native loader {path} allows {limits[0]} threads x {limits[1]} slots, where the loader's "
            f"settings allow {MAX_THREADS} x {MAX_DEPTH}: rebuild it"
        )
    return lib, None


def unavailable_reason(library: str = "") -> str | None:
    """Why the native engine cannot run here (with ``library``, or the one built beside this module), or None."""
    return _load(library)[1]


def _array(ctype: Any, values: Sequence) -> ctypes.Array:
    return (ctype * max(1, len(values)))(*values)


_CHUNK = struct.Struct("=qqqiiii")
_PIECE = struct.Struct("=qQq")
assert _CHUNK.size == ctypes.sizeof(Chunk) and _PIECE.size == ctypes.sizeof(Piece), "packing differs from the structs"


def _pack(
    chunks: Sequence, bases: Sequence[int], sources: Sequence[int] | None
) -> tuple[ctypes.Array, ctypes.Array, int]:
    """The plan as the C engine's Chunk and Piece arrays, packed in one pass (a fill's only per-chunk
    Python work before its first read)."""
    cbuf = bytearray(_CHUNK.size * len(chunks))
    npieces = sum(len(c.pieces) for c in chunks)
    pbuf = bytearray(_PIECE.size * max(1, npieces))
    pack_chunk, pack_piece = _CHUNK.pack_into, _PIECE.pack_into
    first = 0
    for i, c in enumerate(chunks):
        source = c.file if sources is None else sources[i]
        pack_chunk(cbuf, i * _CHUNK.size, c.offset, c.length, first, c.file, len(c.pieces), source, 0)
        for p in c.pieces:
            pack_piece(pbuf, first * _PIECE.size, p.src, bases[p.allocation] + p.offset, p.length)
            first += 1
    return (Chunk * len(chunks)).from_buffer(cbuf), (Piece * max(1, npieces)).from_buffer(pbuf), npieces


def fill(
    chunks: Sequence,
    fds: Sequence[int],
    direct: Sequence[bool],
    paths: Sequence[str],
    bases: Sequence[int],
    *,
    threads: int,
    depth: int,
    slot_size: int,
    host_base: int,
    progress: Callable[[int], None],
    cancel: threading.Event,
    context: int = 0,
    streams: Sequence[int] = (),
    events: Sequence[int] = (),
    cpus: Sequence[int] = (),
    host_mode: bool = False,
    library: str = "",
    sources: Sequence[int] | None = None,
    fault: faults.ChunkFault | None = None,
    direct_request: int = 0,
    direct_grid: int = 0,
    since: float = 0.0,
) -> Filled:
    """Runs ``chunks`` (``plan.ReadChunk``; a piece's destination is ``bases[allocation] + offset``) on the
    native engine; returns its counts and times (Filled). ``fds``/``direct``: every fd of the fill and whether it was
    opened O_DIRECT; ``sources``: per chunk, the index of the fd that reads it (default: its file's);
    ``paths``: per file, for errors. Raises what the Python workers raise for the same failure:
    BadCheckpoint (short file), Aborted (cancel), CudaError (the driver's code), BackendError (a read).
    ``fault`` (tests only, ``FaultPlan.chunk``): the chunk and stage that fail with InjectedFault.
    ``direct_request``: the most bytes one pread of an O_DIRECT read asks for (a multiple of 4 KiB; 0: the
    whole read at once). ``direct_grid``: the chunks read O_DIRECT are re-cut on a grid of this many bytes (a
    multiple of 4 KiB dividing the plan's), each window with copies in it one read trimmed to them (0: read as
    planned); ``reads`` counts those reads, and an error or ``fault`` names the planned chunk cut. ``since``: the
    ``time.perf_counter()`` at which the caller began planning the fill (Filled.planned runs from it)."""
    lib, reason = _load(library)
    if lib is None:
        raise BackendError("native loader", "unavailable", reason)
    if not chunks:
        return Filled(0, 0)
    cs, ps, npieces = _pack(chunks, bases, sources)
    # ctypes keeps the arrays given to pointer fields alive with the job (its _objects) while the C threads run.
    job = Job(
        fds=_array(ctypes.c_int32, fds),
        direct=_array(ctypes.c_uint8, [1 if d else 0 for d in direct]),
        chunks=cs,
        pieces=ps,
        nchunks=len(chunks),
        npieces=npieces,
        nsources=len(fds),
        threads=max(1, min(threads, len(chunks))),
        depth=depth,
        host_mode=1 if host_mode else 0,
        slot_size=slot_size,
        host_base=host_base,
        context=context,
        streams=_array(ctypes.c_uint64, streams),
        events=_array(ctypes.c_uint64, events),
        cpus=_array(ctypes.c_int32, cpus),
        ncpus=len(cpus),
        cancel=1 if cancel.is_set() else 0,
        fault_chunk=fault.chunk if fault else -1,
        fault_stage=faults.CHUNK_STAGES[fault.point] if fault else 0,
        direct_request=direct_request,
        direct_grid=direct_grid,
    )
    runner = threading.Thread(target=lib.hw_fill, args=(ctypes.byref(job),), name="hw-native-fill", daemon=True)
    planned = time.perf_counter() - since if since else 0.0
    runner.start()
    reported = 0
    try:
        while runner.is_alive():
            runner.join(POLL_S)
            if cancel.is_set():
                job.cancel = 1
            done = job.done_bytes
            if done > reported:
                progress(done - reported)
                reported = done
    except BaseException:
        # The C threads write into the caller's ring and allocations: none may outlive this call.
        job.cancel = 1
        runner.join()
        raise
    if job.done_bytes > reported:
        progress(job.done_bytes - reported)
    if job.err_kind:
        raise _error(job, chunks, paths, fault)
    if cancel.is_set():
        raise Aborted("load cancelled")
    return Filled.of(job, planned)


def _error(job: Job, chunks: Sequence, paths: Sequence[str], fault: faults.ChunkFault | None = None) -> Exception:
    op = job.err_op.decode(errors="replace")
    path = paths[job.err_file] if 0 <= job.err_file < len(paths) else None
    chunk = chunks[job.err_chunk] if 0 <= job.err_chunk < len(chunks) else None
    if job.err_kind == ERR_CANCELLED:
        return Aborted("load cancelled")
    if job.err_kind == ERR_INJECTED and fault is not None:
        return faults.fault(fault.point, fault.check, f"{path} at {job.err_offset}")
    if job.err_kind == ERR_TRUNCATED and chunk is not None:
        return BadCheckpoint(
            f"{path}: truncated: ended at byte {job.err_offset}, the header promised data up to "
            f"{chunk.offset + chunk.length}",
            path=path,
        )
    if job.err_kind == ERR_CUDA:
        name = error_name(job.err_code)
        where = f", {path} at {job.err_offset}" if path else ""
        return CudaError(op, job.err_code, f"{op} failed: {name} ({job.err_code}){where}", error=name)
    if job.err_kind == ERR_OS:
        hint = f" {DIRECT_HINT}" if "O_DIRECT" in op else ""
        return BackendError(
            op,
            job.err_code,
            f"{path or 'loader'}: {op} at byte {job.err_offset} failed: {os.strerror(job.err_code)}{hint}",
        )
    if op.startswith(("libcuda", "cu")):
        return BackendError("native loader", "driver", f"the native loader cannot use the CUDA driver: {op} not found")
    return BackendError("native loader", "setup", f"the native loader refused the fill plan ({op}): a bug")
