"""A rank's files: opened once per fill, read positionally (buffered or O_DIRECT), in parallel for the cpu backend."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from hotweights.errors import Aborted, BackendError, BadCheckpoint
from hotweights.format.source import SourceFile, open_error, open_file
from hotweightsd.core import faults
from hotweightsd.core.layout import RankLayout, Segment
from hotweightsd.loaders.plan import DIRECT_ALIGN, ReadChunk

log = logging.getLogger("hotweightsd.loaders")

CHUNK = 16 * 1024 * 1024
DIRECT_HINT = "(the pread read mode reads it buffered)"
DIRECT_RETRIES = 8  # re-reads of a block cut short in a row, without getting further, before giving up


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
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as exc:  # named as the native engine names it: the errno alone says nothing of where
            raise BackendError(
                "pread", exc.errno or "os", f"{path}: pread at byte {offset + got} failed: {exc.strerror}"
            ) from exc
        if n == 0:
            raise BadCheckpoint(
                f"{path}: truncated: ended at byte {offset + got}, the header promised data up to {offset + len(buf)}",
                path=path,
            )
        got += n


def _size(fd: int) -> int:
    """The size of the file open as ``fd``; 0 where it cannot be known, which reads as "ends here"."""
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0


def read_direct(fd: int, buf: memoryview, chunk: ReadChunk, path: str) -> int:
    """Reads the aligned superset of ``chunk`` into ``buf``; returns where the chunk starts in ``buf``."""
    start, length, skip = chunk.direct_span()
    need = skip + chunk.length
    got = furthest = cuts = 0
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
            # The file's end, unless the file goes on: a read cut short is read again from its block's
            # start (O_DIRECT reads whole blocks). A retry may be cut shorter still; the bytes past it are in
            # the buffer from the read before, so the furthest counts.
            if got >= need or start + got >= _size(fd):
                break
            if got > furthest:
                furthest, cuts = got, 0
            else:
                cuts += 1
                if cuts >= DIRECT_RETRIES:
                    raise BackendError(
                        "pread(O_DIRECT)",
                        errno.EIO,
                        f"{path}: O_DIRECT reads at byte {start + max(got, furthest)} were cut short "
                        f"{DIRECT_RETRIES} times in a row, and the file goes on {DIRECT_HINT}",
                    )
            got -= got % DIRECT_ALIGN
    got = max(got, furthest)
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
