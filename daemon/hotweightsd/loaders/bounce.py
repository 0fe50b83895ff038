"""The bounce path's fill: file -> pinned ring slot -> device, reads and copies overlapped.

The plan (``plan``) cuts the rank into reads and copies; the device's ring (``ring``) holds the
slots, streams and events; the engine chosen when the backend started (``path``) runs the loop:
the native engine (``native``: C threads, no interpreter per chunk) or the python workers here.
Each worker takes the next chunk, waits on its slot's event (the copies that last used the slot),
reads into the slot, queues the chunk's copies on its stream and records the slot's event, so its
reads overlap its own earlier copies and every other worker's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from hotweights.cuda import devices as cd
from hotweights.errors import Aborted, BadCheckpoint
from hotweightsd.core import faults
from hotweightsd.core.layout import RankLayout
from hotweightsd.loaders import files, native, ranges, stripes
from hotweightsd.loaders.path import LoadPath
from hotweightsd.loaders.plan import (
    ReadChunk,
    check_plan,
    merge_chunks,
    needed_file_sizes,
    plan_chunks,
    run_end,
    streams,
)
from hotweightsd.loaders.ring import DeviceRing
from hotweightsd.loaders.scheduler import FillScheduler


def fill(
    path: LoadPath,
    ring: DeviceRing,
    scheduler: FillScheduler,
    layout: RankLayout,
    bases: list[int],
    sizes: list[int],
    progress: Callable[[int], None],
    cancel: threading.Event,
) -> str:
    """Copies every segment of ``layout`` into the device allocations at ``bases``; returns a description.

    The caller holds ``ring.lock``. Raises BadCheckpoint (a file shorter than its header promised),
    Aborted (``cancel`` set), or the first CudaError/BackendError a worker hit. Every queued copy has
    finished when it returns or raises.
    """
    t0 = time.perf_counter()
    chunks = plan_chunks(layout.segments(), path.chunk_size)
    check_plan(chunks, sizes)
    needed = needed_file_sizes(chunks, len(layout.files))
    sources = ranges.ReadSources.open(layout.inputs(), path.read_mode, needed, path.chunk_size)
    extra = lustre = timing = ""
    try:
        # O_DIRECT reads on the native engine only: buffered ones have Lustre's readahead, which a
        # reordered plan would defeat, and the python workers merge neighbouring chunks.
        striped = [
            stripes.striping(f.direct_fd) if f.kind == "direct" and path.engine == "native" else None
            for f in sources.files
        ]
        if any(striped):
            chunks = stripes.spread(chunks, striped, path.chunk_size)
            lustre = stripes.describe(striped, path.chunk_size)
        with scheduler.fill() as at_once:
            threads = scheduler.readers(ring.threads, at_once) if path.engine == "native" else ring.threads
            # A fill with a striped Lustre file keeps the stripe order, which spreads reads over OSTs.
            if path.read_order == "streams" and not lustre and 1 < threads < len(chunks):
                chunks = streams(chunks, threads)
                extra = f"; in {threads} streams"
            if path.engine == "native":
                filled = native.fill(
                    chunks,
                    sources.fds,
                    sources.direct,
                    layout.files,
                    bases,
                    threads=threads,
                    depth=ring.depth,
                    slot_size=ring.slot_size,
                    host_base=ring.host_ptr,
                    progress=progress,
                    cancel=cancel,
                    context=int(cd.primary_context(ring.device)),
                    streams=[int(s) for s in ring.streams],
                    events=[int(e) for evs in ring.events for e in evs],
                    cpus=ring.cpus,
                    library=path.native_lib,
                    sources=sources.sources(chunks),
                    fault=faults.current().chunk(len(chunks)),
                    direct_request=path.direct_request,
                    direct_grid=cold_grid(path, striped=bool(lustre)),
                    since=t0,
                )
                reads, copies = filled.reads, filled.copies
                # the reads' share of the time says whether a slow fill waited on the disk or on itself
                account = filled.describe()
                timing = f"; {account}" if account else ""
            else:
                chunks = sources.mark(chunks)
                job = _PythonFill(path, ring, scheduler, chunks, sources, bases, progress, cancel)
                job.run()
                if job.errors:
                    raise next((e for e in job.errors if isinstance(e, BadCheckpoint)), job.errors[0])
                if cancel.is_set():
                    raise Aborted("load cancelled")
                reads, copies = job.reads, job.copies
                if job.merged:
                    extra = f" ({job.merged} of them runs of chunks: other fills ran)" + extra
    finally:
        sources.close()
    for said in (sources.describe(), lustre):
        if said:
            extra += f"; {said}"
    why = f"; {path.engine_why}" if path.engine_why else ""
    return (
        f"{path.describe(threads)} on cuda:{ring.device}{ring.describe_numa()}{ring.describe_memory()}; "
        f"{reads} reads{extra}, {copies} copies{why}{timing}"
    )


def cold_grid(path: LoadPath, *, striped: bool) -> int:
    """The grid a fill's O_DIRECT chunks are re-cut on (0: none). The path has none on the python workers;
    none in pread mode (nothing O_DIRECT), and none for a striped Lustre fill: its order puts one chunk of
    each OST's stripe in flight at once, which re-cut chunks taken in turn would crowd back onto one or two
    OSTs."""
    if path.read_mode == "pread" or striped:
        return 0
    return path.direct_chunk


class _PythonFill:
    """The python workers: one thread per ring reader, the GIL taken per chunk."""

    def __init__(
        self,
        path: LoadPath,
        ring: DeviceRing,
        scheduler: FillScheduler,
        chunks: list[ReadChunk],
        sources: ranges.ReadSources,
        bases: list[int],
        progress: Callable[[int], None],
        cancel: threading.Event,
    ) -> None:
        self.path = path
        self.ring = ring
        self.scheduler = scheduler
        self.chunks = chunks
        self.sources = sources
        self.bases = bases
        self.progress = progress
        self.cancel = cancel
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._next = 0
        self._lock = threading.Lock()
        self.reads = self.copies = self.merged = 0

    def take(self) -> ReadChunk | None:
        """The next chunk; while other fills run, the next run of neighbouring chunks as one read (fewer
        reads: less interpreter time per byte for all fills together)."""
        with self._lock:
            if self._next >= len(self.chunks) or self.stop.is_set() or self.cancel.is_set():
                return None
            i = self._next
            if self.path.busy_chunk <= self.path.chunk_size or not self.scheduler.others_running():
                self._next += 1
                chunk = self.chunks[i]
            else:
                self._next = run_end(self.chunks, i, self.path.chunk_size, self.path.busy_chunk)
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
            threading.Thread(target=self.worker, args=(w,), name=f"hw-h2d-{self.ring.device}-{w}", daemon=True)
            for w in range(min(self.ring.threads, max(1, len(self.chunks))))
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def worker(self, w: int) -> None:
        drv: Any = None
        stream = self.ring.streams[w]
        events = self.ring.events[w]
        pending = [False] * self.ring.depth  # per slot: copies queued out of it
        try:
            drv = cd.init()
            cd.set_current(self.ring.device)
            if self.ring.cpus:
                try:
                    os.sched_setaffinity(0, self.ring.cpus)
                except OSError:
                    pass
            k = 0
            while (chunk := self.take()) is not None:
                s = k % self.ring.depth
                k += 1
                if pending[s]:
                    cd.check(drv.cuEventSynchronize(events[s]), "cuEventSynchronize")
                src = self._read(w, s, chunk)
                faults.hit("load.copy", f"{self.sources.paths[chunk.file]} at {chunk.offset}")
                pending[s] = True
                for p in chunk.pieces:
                    cd.check(
                        drv.cuMemcpyHtoDAsync(self.bases[p.allocation] + p.offset, src + p.src, p.length, stream),
                        "cuMemcpyHtoDAsync",
                        bytes=p.length,
                    )
                cd.check(drv.cuEventRecord(events[s], stream), "cuEventRecord")
                self.progress(chunk.nbytes)
        except BaseException as exc:
            self.fail(exc)
        finally:
            # Whatever happened, no copy may still be in flight when the fill returns.
            if drv is not None:
                try:
                    cd.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
                except BaseException as exc:
                    self.fail(exc)

    def _read(self, w: int, s: int, chunk: ReadChunk) -> int:
        """Reads ``chunk`` into slot ``s`` of reader ``w``; returns the chunk's first byte's address."""
        fd, path = self.sources.fd(chunk), self.sources.files[chunk.file].path
        faults.hit("load.read", f"{path} at {chunk.offset}")
        ptr, view = self.ring.slot(w, s)
        if chunk.direct:
            return ptr + files.read_direct(fd, view, chunk, path)
        files.read_exact(fd, view[: chunk.length], chunk.offset, path)
        return ptr
