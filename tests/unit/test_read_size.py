"""O_DIRECT request sizes: the setting, and the native engine reading with them (host mode).

The engine's reads are checked byte for byte; the request sizes the disk saw are recorded by an
LD_PRELOAD shim around pread in a child process (the sizes the engine asks for, not what the
kernel passes on to the device).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import pytest
from test_native_loader import HostRing, build_shim, needs_lib

from hotweights.errors import InvalidArgument
from hotweightsd.config import load_config
from hotweightsd.loaders import native
from hotweightsd.loaders.path import DEFAULT_DIRECT_CHUNK, DEFAULT_DIRECT_REQUEST, choose
from hotweightsd.loaders.plan import plan_chunks
from hotweightsd.loaders.settings import LoaderSettings
from support.native_fills import expected, random_layout

KiB, MiB = 1024, 1024 * 1024


# ---- the setting -----------------------------------------------------------------------------


@pytest.mark.parametrize("given", [0, 513, 6000])
def test_a_request_size_off_the_block_grid_is_refused_naming_it(given):
    with pytest.raises(InvalidArgument, match=f"direct read size {given} is not a positive multiple of 4096"):
        LoaderSettings(direct_read_size=given)


def test_the_config_key_reaches_the_loader_and_a_size_off_the_grid_stops_the_start():
    cfg = load_config("none", env={"HOTWEIGHTS_DIRECT_READ_SIZE": "1MiB"})
    assert cfg.loader_settings().direct_read_size == MiB
    with pytest.raises(InvalidArgument, match=r"config: loader direct read size 6000 is not a positive multiple"):
        load_config("none", env={"HOTWEIGHTS_DIRECT_READ_SIZE": "6000"})


def _path(**settings):
    return choose(LoaderSettings(gds="off", **settings), cores=16, real_driver=True)


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native engine is not built here")
def test_the_native_engine_reads_cold_chunks_in_requests_of_the_default_size_and_says_so():
    path = _path(direct_chunk_size=4 * MiB)  # cold reads on the chunk grid
    assert path.direct_request == DEFAULT_DIRECT_REQUEST == MiB and path.direct_chunk == 0
    assert "native engine (O_DIRECT in 1MiB requests)" in path.describe() and "1MiB requests" in path.note
    assert _path(direct_read_size=512 * KiB).direct_request == 512 * KiB
    # a request of a whole chunk or more: one request per read, as before there was a setting
    for whole in (_path(direct_read_size=4 * MiB), _path(direct_read_size=8 * MiB), _path(chunk_size=MiB)):
        assert whole.direct_request == 0 and "requests" not in whole.describe()


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native engine is not built here")
def test_the_native_engine_reads_cold_ranges_on_a_finer_grid_by_default_and_says_so():
    path = _path()
    assert path.direct_chunk == DEFAULT_DIRECT_CHUNK == 512 * KiB
    assert "native engine (O_DIRECT in 512KiB reads)" in path.describe() and "512KiB reads" in path.note
    assert _path(direct_chunk_size=MiB).direct_chunk == MiB
    # a grid that does not divide the chunk's, or is not finer, keeps the chunk grid
    for keep in (_path(direct_chunk_size=3 * MiB), _path(direct_chunk_size=4 * MiB), _path(chunk_size=512 * KiB)):
        assert keep.direct_chunk == 0 and "reads)" not in keep.describe()
    assert _path(engine="python").direct_chunk == 0
    assert "O_DIRECT" not in _path(read_mode="pread").describe()


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native engine is not built here")
def test_a_pread_path_does_not_speak_of_o_direct_requests():
    path = _path(read_mode="pread")
    assert path.direct_request == MiB and "requests" not in path.describe()


def test_the_python_workers_read_whole_chunks():
    path = _path(engine="python")
    assert path.direct_request == 0 and "requests" not in path.describe()


# ---- the engine ------------------------------------------------------------------------------


def fill(tmp_path, request: int, *, seed=21, chunk=64 * KiB, threads=4, direct=True):
    paths, segs, size = random_layout(tmp_path, seed)
    chunks = plan_chunks(segs, chunk)
    dest = (ctypes.c_char * (size + 256))()
    ring = HostRing(threads, 2, chunk)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        reads, *_ = native.fill(
            chunks, fds, [direct] * len(fds), paths, [ctypes.addressof(dest)],
            threads=threads, depth=2, slot_size=chunk, host_base=ring.base,
            progress=lambda n: None, cancel=threading.Event(), host_mode=True, direct_request=request,
        )  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)
        ring.close()
    assert dest.raw[:size] == expected(paths, segs, size)
    assert reads == len(chunks)
    return chunks


@needs_lib
@pytest.mark.parametrize("size", [4096, 12 * KiB, 60 * KiB, 64 * KiB, 1 * MiB])
@pytest.mark.parametrize("direct", [True, False])
def test_reads_in_requests_of_any_size_are_exact(tmp_path, size, direct):
    """Sizes that divide the chunk, sizes that do not, sizes past it: every byte lands where the segments say."""
    fill(tmp_path, size, direct=direct)


# LD_PRELOAD: every pread's size, into the file named by PREAD_LOG, at exit (largest and count).
SIZES_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static atomic_long largest, calls;
ssize_t pread(int fd, void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
    if (getenv("PREAD_LOG") && n >= 4096) {
        long seen = atomic_load(&largest);
        while ((long)n > seen && !atomic_compare_exchange_weak(&largest, &seen, (long)n)) {}
        atomic_fetch_add(&calls, 1);
    }
    return real(fd, buf, n, off);
}
ssize_t pread64(int fd, void *buf, size_t n, off_t off) __attribute__((alias("pread")));
__attribute__((destructor)) static void report(void) {
    const char *path = getenv("PREAD_LOG");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fprintf(f, "%ld %ld\n", atomic_load(&largest), atomic_load(&calls)); fclose(f); }
}
"""

SIZES_FILL = r"""
import ctypes, mmap, os, sys, threading
from hotweightsd.loaders import native
from hotweightsd.loaders.plan import Piece, ReadChunk

path, size, direct = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
chunk = 256 * 1024
data = open(path, "rb").read()
ring = mmap.mmap(-1, 2 * chunk)
base = ctypes.addressof(ctypes.c_char.from_buffer(ring))
dest = (ctypes.c_char * len(data))()
plan = [ReadChunk(0, off, chunk, (Piece(0, 0, off, chunk),)) for off in range(0, len(data), chunk)]
fd = os.open(path, os.O_RDONLY)
native.fill(plan, [fd], [direct], [path], [ctypes.addressof(dest)], threads=2, depth=1, slot_size=chunk,
            host_base=base, progress=lambda n: None, cancel=threading.Event(), host_mode=True,
            direct_request=size)
print("exact" if dest.raw == data else "differs")
"""


@needs_lib
@pytest.mark.parametrize(
    "size,direct,largest",
    [(0, True, 256 * KiB), (64 * KiB, True, 64 * KiB), (20 * KiB, True, 20 * KiB), (64 * KiB, False, 256 * KiB)],
    ids=["chunk", "64KiB", "20KiB", "buffered-untouched"],
)
def test_the_disk_sees_requests_of_the_size_asked(tmp_path, size, direct, largest):
    shim = build_shim(tmp_path, SIZES_SHIM, "pread-recording")
    data = tmp_path / "x.bin"
    data.write_bytes(os.urandom(8 * 256 * KiB))
    log = tmp_path / "preads.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "LD_PRELOAD": shim, "PREAD_LOG": str(log)}
    child = subprocess.run(
        [sys.executable, "-c", SIZES_FILL, str(data), str(size), "1" if direct else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0 and child.stdout.strip() == "exact", child.stderr[-2000:]
    seen_largest, calls = map(int, log.read_text().split())
    assert seen_largest == largest
    assert calls >= -(-8 * 256 * KiB // largest)


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native engine is not built here")
def test_cold_chunks_are_re_cut_on_the_native_engine_only_and_never_on_a_striped_lustre_fill():
    from hotweightsd.loaders.bounce import cold_grid

    assert cold_grid(_path(), striped=False) == 512 * KiB
    assert cold_grid(_path(read_mode="odirect"), striped=False) == 512 * KiB
    assert cold_grid(_path(), striped=True) == 0
    assert cold_grid(_path(read_mode="pread"), striped=False) == 0
    assert cold_grid(_path(engine="python"), striped=False) == 0
    assert cold_grid(_path(direct_chunk_size=4 * MiB), striped=False) == 0
