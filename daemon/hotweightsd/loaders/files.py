"""A rank's files: opened once per fill, read positionally (buffered or O_DIRECT), in parallel for the cpu backend."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

from hotweights.errors import Aborted, BackendError, BadCheckpoint
from hotweights.format.source import SourceFile, open_error, open_file
from hotweightsd.core import faults
from hotweightsd.core.layout import RankLayout, Segment
from hotweightsd.loaders import residency
from hotweightsd.loaders.plan import DIRECT_ALIGN, ReadChunk

log = logging.getLogger("hotweightsd.loaders")

CHUNK = 16 * 1024 * 1024
DIRECT_HINT = "(the pread read mode reads it buffered)"


def split(segments: list[Segment], chunk: int = CHUNK) -> Iterator[Segment]:
    """Cuts segments into pieces of at most ``chunk`` bytes so threads share large tensors."""
    for s in segments:
        done = 0
        while done < s.length:
            n = min(chunk, s.length - done)
            yield Segment(s.file, s.file_offset + done, n, s.allocation, s.offset + done)
            done += n


def open_source(source: SourceFile | str, direct: bool) -> tuple[int, bool]:
    """(fd, opened O_DIRECT) of a new descriptor of ``source``, the checkpoint's open file (a path only
    for a layout made without one, opened as ``open_file`` does). A filesystem that refuses O_DIRECT
    (tmpfs) gets a buffered fd."""
    if isinstance(source, str):
        with open_file(source) as opened:
            return open_source(opened, direct)
    path = source.path
    if direct:
        try:
            return source.reopen(direct=True), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise open_error(path, exc) from exc
            log.info("%s: O_DIRECT refused by its filesystem; reading it buffered", path)
    try:
        return source.reopen(), False
    except OSError as exc:
        raise open_error(path, exc) from exc


# With read mode auto, a file at least this much in the page cache (or on a memory filesystem) is read
# buffered (a copy out of memory); below it, O_DIRECT (storage's rate, no second copy through the cache).
RESIDENT_ENOUGH = 0.5


def open_auto(source: SourceFile | str) -> tuple[int, bool, float]:
    """(fd, opened O_DIRECT, resident fraction): buffered where the file is in memory, O_DIRECT where not."""
    path = source if isinstance(source, str) else source.path
    fd, _ = open_source(source, False)
    try:
        fraction, memory = residency.sampled_fraction(fd)
    except OSError as exc:
        os.close(fd)
        raise BadCheckpoint(f"{path}: cannot read its page-cache residency: {exc.strerror}", path=path) from exc
    if memory or fraction >= RESIDENT_ENOUGH:
        return fd, False, fraction
    os.close(fd)
    direct_fd, direct = open_source(source, True)
    return direct_fd, direct, fraction


@dataclass
class SourceFiles:
    """A layout's files opened for one fill, each checked long enough for its plan; closed by ``close()``.

    ``mode``: pread (buffered), odirect, or auto (each file by its page-cache residency, ``open_auto``)."""

    paths: list[str]
    fds: list[int] = field(default_factory=list)
    direct: list[bool] = field(default_factory=list)
    resident: list[float] = field(default_factory=list)  # auto only: each file's resident fraction

    @classmethod
    def open(cls, sources: Sequence[SourceFile | str], mode: str, needed: list[int]) -> SourceFiles:
        """``sources``: the checkpoint's open files (``RankLayout.inputs()``), or paths."""
        files = cls([s if isinstance(s, str) else s.path for s in sources])
        try:
            for source, path, need in zip(sources, files.paths, needed):
                if mode == "auto":
                    fd, is_direct, fraction = open_auto(source)
                    files.resident.append(fraction)
                else:
                    fd, is_direct = open_source(source, mode == "odirect")
                files.fds.append(fd)
                files.direct.append(is_direct)
                size = os.fstat(fd).st_size
                if size < need:
                    raise BadCheckpoint(
                        f"{path}: truncated: {size} bytes, the header promised data up to {need}", path=path
                    )
        except BaseException:
            files.close()
            raise
        return files

    @property
    def buffered_fallbacks(self) -> int:
        return sum(1 for d in self.direct if not d)

    def describe_auto(self) -> str:
        """What read mode auto chose, for the load's description."""
        direct = sum(self.direct)
        cached = len(self.direct) - direct
        parts = []
        if direct:
            parts.append(f"{direct} file(s) O_DIRECT (cold)")
        if cached:
            low = min(f for f, d in zip(self.resident, self.direct) if not d)
            parts.append(f"{cached} buffered (at least {low:.0%} in page cache)")
        return "auto: " + ", ".join(parts)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class OpenFiles:
    """The layout's files reopened once, read-only; closed on exit."""

    def __init__(self, layout: RankLayout) -> None:
        self._stack = ExitStack()
        self.fds: list[int] = []
        self.paths = layout.files
        try:
            for source in layout.inputs():
                fd, _ = open_source(source, False)
                self._stack.callback(os.close, fd)
                self.fds.append(fd)
        except BaseException:
            self._stack.close()  # the files opened before the one that failed
            raise

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def read_exact(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fills ``buf`` from ``offset``; a short read means the file shrank since its header was read."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise BadCheckpoint(
                f"{path}: truncated: ended at byte {offset + got}, the header promised data up to {offset + len(buf)}",
                path=path,
            )
        got += n


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
                f"{path}: O_DIRECT read of {length - got} bytes at {start + got} failed: {exc.strerror} {DIRECT_HINT}",
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


def parallel_read(
    layout: RankLayout,
    dest: Callable[[Segment], memoryview],
    threads: int,
    progress: Callable[[int], None],
    cancel: threading.Event,
    chunk: int = CHUNK,
) -> None:
    """Reads every segment of ``layout`` into the buffer ``dest(segment)`` returns, in parallel."""
    with OpenFiles(layout) as files:

        def one(seg: Segment) -> None:
            if cancel.is_set():
                raise Aborted("load cancelled")
            where = f"{files.paths[seg.file]} at {seg.file_offset}"
            # Released here, not when the exception's traceback is collected: a live view keeps the
            # destination's mapping (and its memfd) open after the allocation is closed.
            view = dest(seg)
            try:
                faults.hit("load.read", where)  # as a read that fails with the destination mapped
                read_exact(files.fds[seg.file], view, seg.file_offset, files.paths[seg.file])
            finally:
                view.release()
            faults.hit("load.copy", where)  # the read landed in the destination's pages
            progress(seg.length)

        pieces = list(split(layout.segments(), chunk))
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="hw-read") as pool:
            futures = [pool.submit(one, p) for p in pieces]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                cancel.set()
                raise
