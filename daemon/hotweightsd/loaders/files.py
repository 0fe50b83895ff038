"""Parallel positional reads of a layout's segments, shared by the backends' host-side paths."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from hotweights.errors import Aborted, BadCheckpoint
from hotweightsd.core.layout import RankLayout, Segment

CHUNK = 16 * 1024 * 1024


def split(segments: list[Segment], chunk: int = CHUNK) -> Iterator[Segment]:
    """Cuts segments into pieces of at most ``chunk`` bytes so threads share large tensors."""
    for s in segments:
        done = 0
        while done < s.length:
            n = min(chunk, s.length - done)
            yield Segment(s.file, s.file_offset + done, n, s.allocation, s.offset + done)
            done += n


class OpenFiles:
    """The layout's files opened once, read-only; closed on exit."""

    def __init__(self, layout: RankLayout, flags: int = 0) -> None:
        self._stack = ExitStack()
        self.fds: list[int] = []
        self.paths = layout.files
        for path in layout.files:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
            self._stack.callback(os.close, fd)
            self.fds.append(fd)

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
            read_exact(files.fds[seg.file], dest(seg), seg.file_offset, files.paths[seg.file])
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
