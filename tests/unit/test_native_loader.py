"""The native loader engine (hwfill.c) in host mode: the same C loop as on a GPU, with memcpy for the copies.

Real files, real reads, real threads; destinations and the ring are host memory. What the GPU adds
(driver calls on streams and events) runs in tests/gpu.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import mmap
import os
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import pytest

from hotweights.errors import Aborted, BackendError, BadCheckpoint
from hotweights.testing import CLI_TIMEOUT
from hotweightsd.core.layout import Segment
from hotweightsd.loaders import native
from hotweightsd.loaders.path import choose
from hotweightsd.loaders.plan import Piece, ReadChunk, needed_file_sizes, plan_chunks, streams
from hotweightsd.loaders.settings import LoaderSettings
from support.native_fills import expected, random_layout

MiB = 1024 * 1024


def c_compiler() -> str | None:
    """The compiler setup.py builds the library with (``CC``, else Python's own), if this machine has it."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(shlex.split(cc)[0])


# Where a compiler exists, install builds the library (setup.py fails otherwise): these tests then run and
# fail if it is missing. Only a machine without any C compiler skips them.
needs_lib = pytest.mark.skipif(
    c_compiler() is None and native.unavailable_reason() is not None,
    reason=f"no C compiler here, so no native loader: {native.unavailable_reason()}",
)


def test_the_native_library_is_built_wherever_a_c_compiler_exists():
    if c_compiler() is None:
        pytest.skip("no C compiler on this machine: installs go without the native loader (setup.py warns)")
    assert native.unavailable_reason() is None, "pip install -e . (make setup) builds it beside loaders/native.py"


class HostRing:
    """Page-aligned host memory standing in for the pinned ring."""

    def __init__(self, threads: int, depth: int, slot: int) -> None:
        self.threads, self.depth, self.slot = threads, depth, slot
        self.map = mmap.mmap(-1, threads * depth * slot)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.base = ctypes.addressof(self._anchor)

    def close(self) -> None:
        del self._anchor
        self.map.close()


def run(chunks, paths, dest, ring, *, direct=False, cancel=None, fds=None, progress=None, grid=0):
    """``direct``: one flag for every file, or a list (a file per flag); ``grid``: the O_DIRECT re-cut grid."""
    own = fds is None
    fds = fds if fds is not None else [os.open(p, os.O_RDONLY) for p in paths]
    direct = direct if isinstance(direct, list) else [direct] * len(fds)
    try:
        return native.fill(
            chunks,
            fds,
            direct,
            paths,
            [ctypes.addressof(dest)],
            threads=ring.threads,
            depth=ring.depth,
            slot_size=ring.slot,
            host_base=ring.base,
            progress=progress or (lambda n: None),
            cancel=cancel or threading.Event(),
            host_mode=True,
            direct_grid=grid,
            since=time.perf_counter(),
        )
    finally:
        if own:
            for fd in fds:
                os.close(fd)


@needs_lib
@pytest.mark.parametrize(
    "seed,threads,depth,chunk,direct",
    [
        (0, 1, 1, 64 * 1024, False),
        (1, 4, 2, 64 * 1024, True),
        (2, 8, 3, 1 * MiB, False),
        (3, 3, 2, 4096, True),
        (4, 16, 2, 1 * MiB, True),
        (5, 2, 4, 256 * 1024, False),
    ],
)
def test_native_fill_is_exact(tmp_path, seed, threads, depth, chunk, direct):
    """Every byte lands where the segments say; progress adds up; reads and copies match the plan.
    ``direct`` reads the 4 KiB-aligned superset (what O_DIRECT needs) from an ordinary fd."""
    paths, segs, size = random_layout(tmp_path, seed)
    chunks = plan_chunks(segs, chunk)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(threads, depth, chunk)
    seen = []
    try:
        filled = run(chunks, paths, dest, ring, direct=direct, progress=seen.append)
    finally:
        ring.close()
    assert dest.raw[:size] == expected(paths, segs, size)
    assert filled[:2] == (len(chunks), sum(len(c.pieces) for c in chunks))
    assert sum(seen) == sum(c.nbytes for c in chunks)
    # where the time went: each reader's share is inside its own span, the whole inside the call
    assert filled.threads == min(threads, len(chunks))
    assert filled.reading > 0 and min(filled.waiting, filled.queueing, filled.draining) >= 0
    spent = filled.reading + filled.waiting + filled.queueing + filled.draining
    assert spent <= filled.threads * filled.wall
    assert 0 <= filled.setup <= filled.wall and 0 <= filled.tail <= filled.wall
    assert filled.planned > 0 and filled.describe().startswith("planned in "), filled.describe()
    assert "% reading" in filled.describe() and "% draining" in filled.describe(), filled.describe()


def _stripe_order(plan: list, n_files: int, chunk: int) -> list:
    """The plan reordered across stripes, as a striped Lustre file gets it."""
    from hotweightsd.loaders import stripes

    layout = [stripes.Component(0, stripes.EOF_EXTENT, 4 * chunk, 3)]
    return stripes.spread(plan, [layout] * n_files, chunk)


def _streams_order(plan: list, n_files: int, chunk: int) -> list:
    """The plan dealt into one stream per reader."""
    return streams(plan, 4)


@needs_lib
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("order", [_stripe_order, _streams_order], ids=["lustre-stripes", "streams"])
def test_a_reordered_plan_is_exact(tmp_path, direct, order):
    """The native engine reads a plan in another order than the file's into the same bytes."""
    paths, segs, size = random_layout(tmp_path, 7)
    chunk = 64 * 1024
    plan = plan_chunks(segs, chunk)
    chunks = order(plan, len(paths), chunk)
    assert chunks != plan and sorted(chunks) == sorted(plan)
    _read_exactly(chunks, paths, segs, size, chunk, direct)


def _read_exactly(chunks, paths, segs, size, slot, direct):
    """Reads ``chunks`` on the native engine (4 readers, slots of ``slot`` bytes): one read a chunk, every
    byte where the segments say."""
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(4, 2, slot)
    try:
        reads = run(chunks, paths, dest, ring, direct=direct).reads
    finally:
        ring.close()
    assert dest.raw[:size] == expected(paths, segs, size)
    assert reads == len(chunks)


def windows_with_copies(chunk: ReadChunk, grid: int) -> int:
    """The windows of ``grid`` bytes some copy of ``chunk`` has bytes in."""
    return len(
        {
            w
            for p in chunk.pieces
            for w in range((chunk.offset + p.src) // grid, (chunk.offset + p.src + p.length - 1) // grid + 1)
        }
    )


@needs_lib
@pytest.mark.parametrize("seed", range(6))
def test_o_direct_chunks_re_cut_on_a_finer_grid_are_exact_one_read_a_window_with_copies(tmp_path, seed):
    """With a grid, the engine reads each chunk of an O_DIRECT file once per window of the grid that has a copy in
    it (a window of a hole read through is not read); the buffered file's chunks as planned; every byte lands
    where the segments say, through the ring of the plan's grid."""
    paths, segs, size = random_layout(tmp_path, 40 + seed)
    chunk, grid = 64 * 1024, random.Random(seed).choice([4096, 16 * 1024, 32 * 1024])
    plan = plan_chunks(segs, chunk)
    direct = [True, False, True] if seed % 3 else [False] * 3  # none O_DIRECT (warm): nothing re-cut
    want = sum(windows_with_copies(c, grid) if direct[c.file] else 1 for c in plan)
    assert want > len(plan) if any(direct) else want == len(plan)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(4, 2, chunk)
    try:
        reads, copies = run(plan, paths, dest, ring, direct=direct, grid=grid)[:2]
    finally:
        ring.close()
    assert dest.raw[:size] == expected(paths, segs, size)
    assert reads == want
    assert copies >= sum(len(c.pieces) for c in plan)


@needs_lib
def test_a_truncated_file_read_on_a_finer_grid_names_the_planned_chunk(tmp_path):
    """An error in a re-cut read names the chunk the caller planned: the header's promise is the planned end."""
    paths, segs, size = random_layout(tmp_path, 7, nfiles=2)
    chunks = plan_chunks(segs, 64 * 1024)
    last = max(c.offset + c.length for c in chunks if c.file == 1)
    os.truncate(paths[1], last - 100)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(4, 2, 64 * 1024)
    try:
        with pytest.raises(
            BadCheckpoint, match=rf"f1\.bin: truncated: ended at byte \d+, the header promised data up to {last}$"
        ):
            run(chunks, paths, dest, ring, direct=True, grid=4096)
    finally:
        ring.close()


@needs_lib
def test_direct_and_buffered_files_mixed(tmp_path):
    """Files read buffered (O_DIRECT refused by their filesystem) among O_DIRECT ones, in one fill."""
    paths, segs, size = random_layout(tmp_path, 14, nfiles=3)
    chunks = plan_chunks(segs, 64 * 1024)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(6, 2, 64 * 1024)
    try:
        run(chunks, paths, dest, ring, direct=[True, False, True])
    finally:
        ring.close()
    assert dest.raw[:size] == expected(paths, segs, size)


@needs_lib
@pytest.mark.parametrize("threads", [1, 5])
def test_a_half_cached_file_is_read_through_both_its_fds(tmp_path, threads):
    """Read mode auto's ranges on the native engine: the resident half through the buffered fd, the cold
    half through the O_DIRECT one (its aligned superset), every byte where the segments say."""
    from pathlib import Path

    from hotweightsd.loaders.ranges import ReadSources
    from support import pagecache

    chunk = 64 * 1024
    d = Path(tempfile.mkdtemp(prefix="hw-native-mixed-", dir=pagecache.disk_dir(tmp_path)))
    try:
        paths, segs, size = random_layout(d, 21, nfiles=2)
        for p in paths:
            pagecache.half_cached(Path(p), chunk)
        chunks = plan_chunks(segs, chunk)
        sources = ReadSources.open(paths, "auto", needed_file_sizes(chunks, len(paths)), chunk)
        try:
            kinds = [f.kind for f in sources.files]
            chunks = sources.mark(chunks)
            dest = (ctypes.c_char * (size + 256))()
            ring = HostRing(threads, 2, chunk)
            try:
                reads, *_ = native.fill(
                    chunks,
                    sources.fds,
                    sources.direct,
                    paths,
                    [ctypes.addressof(dest)],
                    threads=threads,
                    depth=2,
                    slot_size=chunk,
                    host_base=ring.base,
                    progress=lambda n: None,
                    cancel=threading.Event(),
                    host_mode=True,
                    sources=[sources.source(c) for c in chunks],
                )
            finally:
                ring.close()
        finally:
            sources.close()
        assert kinds == ["mixed", "mixed"]
        assert {c.direct for c in chunks} == {False, True}
        assert reads == len(chunks)
        assert dest.raw[:size] == expected(paths, segs, size)
    finally:
        shutil.rmtree(d)


@needs_lib
def test_truncated_file_is_a_bad_checkpoint_naming_the_file(tmp_path):
    paths, segs, size = random_layout(tmp_path, 7, nfiles=2)
    chunks = plan_chunks(segs, 64 * 1024)
    last = max(c.offset + c.length for c in chunks if c.file == 1)
    os.truncate(paths[1], last - 100)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(4, 2, 64 * 1024)
    try:
        with pytest.raises(
            BadCheckpoint, match=r"f1\.bin: truncated: ended at byte \d+, the header promised data up to"
        ):
            run(chunks, paths, dest, ring)
    finally:
        ring.close()


@needs_lib
def test_cancel_stops_the_fill(tmp_path):
    paths, segs, size = random_layout(tmp_path, 8)
    chunks = plan_chunks(segs, 4096)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(2, 2, 4096)
    cancel = threading.Event()
    cancel.set()
    try:
        with pytest.raises(Aborted):
            run(chunks, paths, dest, ring, cancel=cancel)
    finally:
        ring.close()


@needs_lib
def test_a_failing_progress_callback_stops_the_fill_before_it_returns(tmp_path):
    """The C threads write into the caller's ring: when the caller's side fails, none may outlive the call."""
    p = tmp_path / "big.bin"
    p.write_bytes(os.urandom(64 * MiB))
    chunks = plan_chunks([Segment(0, 0, 64 * MiB, 0, 0)], 4096)
    dest = (ctypes.c_char * (64 * MiB))()
    ring = HostRing(2, 2, 4096)

    def progress(n):
        raise RuntimeError("progress failed")

    try:
        with pytest.raises(RuntimeError, match="progress failed"):
            run(chunks, [str(p)], dest, ring, progress=progress)
    finally:
        ring.close()  # would crash the process if a C thread still wrote into it


@needs_lib
@pytest.mark.parametrize("direct,op", [(False, "pread"), (True, "pread(O_DIRECT)")])
def test_read_error_names_the_call_and_the_errno(tmp_path, direct, op):
    paths, segs, size = random_layout(tmp_path, 9, nfiles=1)
    chunks = plan_chunks(segs, 64 * 1024)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(2, 2, 64 * 1024)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        with pytest.raises(BackendError) as ei:
            run(chunks, paths, dest, ring, fds=[fd], direct=direct)
        assert ei.value.op == op and ei.value.code == 21
        assert "Is a directory" in ei.value.message
    finally:
        os.close(fd)
        ring.close()


@needs_lib
def test_a_plan_that_does_not_fit_the_ring_is_refused_before_reading(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(range(256)) * 1024)
    dest = (ctypes.c_char * (256 * 1024))()
    chunk = ReadChunk(0, 0, 256 * 1024, (Piece(0, 0, 0, 256 * 1024),))
    ring = HostRing(1, 1, 64 * 1024)
    try:
        with pytest.raises(BackendError, match="refused the fill plan"):
            run([chunk], [str(p)], dest, ring)
    finally:
        ring.close()
    assert dest.raw == bytes(256 * 1024), "nothing was read or copied"


# LD_PRELOAD: large preads end inside a block, as a network or FUSE filesystem may cut an O_DIRECT read
# short in the middle of a file. CUT=once: the first read; CUT=shorter: the first, then its retry shorter
# still; CUT=always: every read. A read is cut inside a block whatever size it asks for.
CUT_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static atomic_int reads;
ssize_t pread(int fd, void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
    const char *mode = getenv("CUT");
    if (n > 1000 && mode) {
        int k = atomic_fetch_add(&reads, 1);
        if (!strcmp(mode, "always")) n = 1000;
        else if (k == 0) n = n > 4096 + 1000 ? 4096 + 1000 : n - 1000;
        else if (k == 1 && !strcmp(mode, "shorter")) n = 500;
    }
    return real(fd, buf, n, off);
}
ssize_t pread64(int fd, void *buf, size_t n, off_t off) __attribute__((alias("pread")));
"""

CUT_FILL = r"""
import ctypes, mmap, os, sys, threading
from hotweightsd.loaders import native
from hotweightsd.loaders.plan import Piece, ReadChunk

path, request = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
ring = mmap.mmap(-1, 64 * 1024)
base = ctypes.addressof(ctypes.c_char.from_buffer(ring))
dest = (ctypes.c_char * len(data))()
chunk = ReadChunk(0, 100, 6 * 4096, (Piece(0, 0, 0, 6 * 4096),))
fd = os.open(path, os.O_RDONLY)
try:
    native.fill([chunk], [fd], [True], [path], [ctypes.addressof(dest)], threads=1, depth=1, slot_size=64 * 1024,
                host_base=base, progress=lambda n: None, cancel=threading.Event(), host_mode=True,
                direct_request=request)
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("exact" if dest.raw[: 6 * 4096] == data[100 : 100 + 6 * 4096] else "differs")
"""


def build_shim(tmp_path, source: str, what: str) -> str:
    """``source`` compiled into a library to LD_PRELOAD; skips the test where no C compiler exists."""
    cc = c_compiler()
    if cc is None:
        pytest.skip(f"no C compiler to build the {what} shim")
    shim = tmp_path / f"{what.replace(' ', '-')}.so"
    subprocess.run(
        [*shlex.split(cc), "-shared", "-fPIC", "-o", str(shim), "-x", "c", "-", "-ldl"],
        input=source,
        text=True,
        check=True,
        timeout=CLI_TIMEOUT,
    )
    return str(shim)


# the whole span in one request, and the engine's split into requests of one and two blocks
CUT_REQUESTS = pytest.mark.parametrize("request_size", [0, 4096, 8192], ids=["whole", "4KiB-requests", "8KiB-requests"])


def _cut_fill(tmp_path, mode: str, request: int) -> str:
    shim = build_shim(tmp_path, CUT_SHIM, "read-cutting")
    p = tmp_path / "x.bin"
    p.write_bytes(os.urandom(8 * 4096 + 77))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "LD_PRELOAD": shim, "CUT": mode}
    child = subprocess.run(
        [sys.executable, "-c", CUT_FILL, str(p), str(request)], env=env, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout.strip()


@needs_lib
@CUT_REQUESTS
def test_an_o_direct_read_cut_inside_a_block_mid_file_is_read_again_not_taken_for_the_end(tmp_path, request_size):
    assert _cut_fill(tmp_path, "once", request_size) == "exact"


@needs_lib
@CUT_REQUESTS
def test_a_retry_cut_shorter_than_the_read_before_still_reads_the_chunk_exactly(tmp_path, request_size):
    assert _cut_fill(tmp_path, "shorter", request_size) == "exact"


@needs_lib
@CUT_REQUESTS
def test_reads_cut_short_again_and_again_are_an_io_error_not_a_truncated_checkpoint(tmp_path, request_size):
    got = _cut_fill(tmp_path, "always", request_size)
    assert got.startswith("BackendError") and "cut short" in got and "truncated" not in got, got


# Plans no planner makes, handed to the C engine as they are (one per line: case name, what it changes);
# run in a child process, so a plan that slips past validate() and crashes the engine fails only its test.
BAD_PLANS = r"""
import ctypes, mmap, os, sys
from hotweightsd.loaders import native

I64 = 2**63 - 1
path = sys.argv[1]
lib, why = native._load()
assert lib is not None, why
ring = mmap.mmap(-1, 2 * 4096)
base = ctypes.addressof(ctypes.c_char.from_buffer(ring))
dest = (ctypes.c_char * 4096)()
fd = os.open(path, os.O_RDONLY)


def attempt(name, chunk={}, piece={}, odirect=0, **job):
    c = dict(offset=0, length=16, first_piece=0, file=0, npieces=1, source=0) | chunk
    p = dict(src=0, dst=ctypes.addressof(dest), length=16) | piece
    fields = dict(
        fds=(ctypes.c_int32 * 1)(fd), direct=(ctypes.c_uint8 * 1)(odirect),
        chunks=(native.Chunk * 1)(native.Chunk(**c)), pieces=(native.Piece * 1)(native.Piece(**p)),
        nchunks=1, npieces=1, nsources=1, threads=1, depth=1, host_mode=1, slot_size=4096, host_base=base,
    ) | job
    j = native.Job(**fields)
    kind = lib.hw_fill(ctypes.byref(j))
    said = native._error(j, [], [path]) if kind else "filled"
    print(name, "|", said, "|", "copied" if any(dest.raw) else "nothing copied", flush=True)


attempt("piece past its chunk", piece=dict(src=I64 - 15, length=32))
attempt("pieces past the plan", chunk=dict(first_piece=I64 - 1, npieces=2))
attempt("block past the largest offset", chunk=dict(offset=I64 - 100), odirect=1)
attempt("no sources", nsources=0)
attempt("no fds", fds=None)
attempt("no direct flags", direct=None)
attempt("no chunks", chunks=None)
attempt("no pieces", pieces=None)
attempt("no cpus", ncpus=1)
attempt("a direct request off the block grid", direct_request=1000)
attempt("a negative direct request", direct_request=-4096)
attempt("a direct grid off the block grid", direct_grid=1000)
attempt("a negative direct grid", direct_grid=-4096)
"""


@needs_lib
def test_plans_whose_bounds_overflow_or_lack_arrays_are_refused_not_run(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(range(1, 256)) * 40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.run(
        [sys.executable, "-c", BAD_PLANS, str(p)], env=env, capture_output=True, text=True, timeout=60
    )
    lines = [line.split(" | ") for line in child.stdout.splitlines()]
    done = [line[0] for line in lines]
    assert child.returncode == 0, f"the engine died ({child.returncode}) after {done}: {child.stderr[-2000:]}"
    assert len(lines) == 13
    for case, said, copied in lines:
        assert "refused the fill plan" in said and copied == "nothing copied", (case, said, copied)


@needs_lib
@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is installed here")
def test_a_device_fill_without_a_driver_says_so(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(8192))
    chunk = ReadChunk(0, 0, 8192, (Piece(0, 0, 0, 8192),))
    ring = HostRing(1, 1, 8192)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(BackendError, match="cannot use the CUDA driver: libcuda.so.1 not found"):
            native.fill(
                [chunk],
                [fd],
                [False],
                [str(p)],
                [1 << 40],
                threads=1,
                depth=1,
                slot_size=8192,
                host_base=ring.base,
                progress=lambda n: None,
                cancel=threading.Event(),
                context=1,
                streams=[1],
                events=[1],
            )
    finally:
        os.close(fd)
        ring.close()


def engine_of(tmp_path=None, real_driver: bool = True, **settings) -> tuple[str, str]:
    p = choose(LoaderSettings(gds="off", **settings), cores=16, real_driver=real_driver)
    return p.engine, p.engine_why


def test_engine_choice_is_never_silent(tmp_path):
    assert engine_of(engine="python") == ("python", "python workers by configuration")
    assert engine_of(real_driver=False) == ("python", "python workers: not the CUDA driver (a test double)")
    with pytest.raises(BackendError, match="native loader engine was asked for, but not the CUDA driver"):
        engine_of(real_driver=False, engine="native")
    missing = str(tmp_path / "nope.so")
    kind, why = engine_of(native_lib=missing)
    assert kind == "python" and why.startswith(f"python workers: native loader {missing} does not load")
    with pytest.raises(BackendError, match="does not load"):
        engine_of(native_lib=missing, engine="native")


@needs_lib
def test_auto_takes_the_native_engine_where_it_loads():
    """One engine for every read mode (docs/loader.md: The engine)."""
    for mode in ("auto", "pread", "odirect"):
        assert engine_of(read_mode=mode) == ("native", "")
        assert engine_of(engine="native", read_mode=mode) == ("native", "")


def test_a_missing_or_foreign_library_is_reported(tmp_path):
    missing = str(tmp_path / "nope.so")
    assert "does not load" in native.unavailable_reason(missing)
    with pytest.raises(BackendError, match="does not load"):
        native.fill(
            [],
            [],
            [],
            [],
            [],
            threads=1,
            depth=1,
            slot_size=4096,
            host_base=1,
            progress=print,
            cancel=threading.Event(),
            host_mode=True,
            library=missing,
        )
    assert "libc.so.6 does not load" in native.unavailable_reason("libc.so.6")  # loads, but has no hw_abi


def test_the_path_describes_the_engine_that_ran():
    python = choose(LoaderSettings(threads=12, gds="off"), cores=16, real_driver=False)
    assert python.describe() == "auto ring 12 threads x 2 x 4MiB (16MiB while other fills run)"
    built = dataclasses.replace(python, engine="native", engine_why="")
    assert built.describe() == "auto ring 12 threads x 2 x 4MiB, native engine"
    assert built.describe(10) == "auto ring 10 threads x 2 x 4MiB, native engine (ring of 12: fills ran at once)"
    assert built.slot_size == 4 * MiB and python.slot_size == 16 * MiB
