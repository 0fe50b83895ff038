"""The cuda backend's logic without a GPU: chunk planning, the ring loader and the driver error paths,
on the fake driver of tests/support/fake_cuda.py (host memory behind fake device addresses). It runs
in CI, where neither a GPU nor cuda-bindings is installed.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import random
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from hotweights.cuda import devices as cuda_driver
from hotweights.cuda import driver as cuda_import
from hotweights.errors import Aborted, BackendError, BadCheckpoint, CudaError, InsufficientMemory, InvalidArgument
from hotweights.testing import fds_under
from hotweightsd.core.backend import AllocationMode, HandleType
from hotweightsd.core.layout import Segment, plan_rank
from hotweightsd.loaders import files, gds, hostmem, native
from hotweightsd.loaders.path import choose, default_threads
from hotweightsd.loaders.plan import (
    Piece,
    ReadChunk,
    check_plan,
    merge_chunks,
    plan_chunks,
    run_end,
)
from hotweightsd.loaders.scheduler import FillScheduler
from hotweightsd.loaders.settings import LoaderSettings
from support import fake_cuda, pagecache
from support.fake_cuda import (
    GRAN,
    CUresult,
    FakeDriver,
    MiB,
    check_contents,
    load_rank,
    make_backend,
    prepared,
    write_ckpt,
)

fake, fake_cufile = fake_cuda.fake, fake_cuda.fake_cufile  # its fixtures

# --- planning -------------------------------------------------------------------------------------------


def seg(file, off, n, alloc, dst):
    return Segment(file, off, n, alloc, dst)


def test_plan_packs_small_tensors_into_one_read_and_merges_contiguous_copies():
    segs = [seg(0, 100, 1000, 0, 0), seg(0, 1100, 24, 0, 1024), seg(0, 1124, 100, 0, 1280)]
    chunks = plan_chunks(segs, chunk_size=1 * MiB)
    assert len(chunks) == 1
    c = chunks[0]
    assert (c.file, c.offset, c.length) == (0, 100, 1124)
    # 100..1100 -> 0..1000 and 1100..1124 -> 1024..1048 are not contiguous on the device side;
    # 1100..1124 -> 1024 and 1124..1224 -> 1280 neither (256-byte padding)
    assert c.pieces == (Piece(0, 0, 0, 1000), Piece(1000, 0, 1024, 24), Piece(1024, 0, 1280, 100))
    merged = plan_chunks([seg(0, 0, 256, 0, 0), seg(0, 256, 512, 0, 256)], chunk_size=4096)
    assert merged[0].pieces == (Piece(0, 0, 0, 768),)


def test_plan_cuts_large_tensors_at_window_boundaries():
    w = 64 * 1024
    segs = [seg(0, 8 + 100, 3 * w, 0, 0), seg(0, 8 + 100 + 3 * w, 10, 0, 3 * w + 256 - (3 * w % 256 or 256))]
    chunks = plan_chunks(segs, chunk_size=w)
    assert [c.offset // w for c in chunks] == [0, 1, 2, 3]
    for c in chunks:
        assert c.offset // w == (c.offset + c.length - 1) // w, "a chunk never leaves its window"
        start, length, skip = c.direct_span()
        assert start % 4096 == 0 and length % 4096 == 0 and length <= w
        assert start // w == c.offset // w and skip == c.offset - start
    assert sum(c.nbytes for c in chunks) == 3 * w + 10


def test_plan_splits_around_large_holes_and_by_file():
    segs = [seg(0, 0, 10, 0, 0), seg(0, 3 * MiB, 10, 0, 256), seg(1, 0, 10, 0, 512)]
    chunks = plan_chunks(segs, chunk_size=16 * MiB, max_gap=1 * MiB)
    assert [(c.file, c.offset, c.length) for c in chunks] == [(0, 0, 10), (0, 3 * MiB, 10), (1, 0, 10)]
    near = plan_chunks([seg(0, 0, 10, 0, 0), seg(0, 4096, 10, 0, 256)], chunk_size=16 * MiB)
    assert len(near) == 1 and near[0].length == 4106


@pytest.mark.parametrize("seed", range(8))
def test_plan_covers_every_byte_once(seed):
    rng = random.Random(seed)
    segs, dst = [], 0
    for f in range(3):
        pos = rng.randrange(8, 5000)
        for _ in range(rng.randrange(1, 30)):
            n = rng.choice([1, 7, 255, 256, 4096, rng.randrange(1, 300_000)])
            pos += rng.choice([0, 0, 0, 3, 5000, 2 * MiB])
            dst = -(-dst // 256) * 256
            segs.append(seg(f, pos, n, 0, dst))
            pos += n
            dst += n
    chunk = rng.choice([4096, 65536, 1 * MiB])
    chunks = plan_chunks(list(reversed(segs)), chunk_size=chunk)
    check_plan(chunks, [dst + 256])
    # map every source byte through the plan and compare with the segments' own mapping
    got = {}
    for c in chunks:
        assert c.length <= chunk
        for p in c.pieces:
            assert 0 <= p.src and p.src + p.length <= c.length
            got.setdefault(c.file, []).append((c.offset + p.src, p.offset, p.length))
    for f in got:
        want = sorted((s.file_offset, s.offset, s.length) for s in segs if s.file == f)
        have = sorted(got[f])

        # merge adjacent runs on both sides before comparing
        def runs(xs):
            out = []
            for a, b, n in xs:
                if out and out[-1][0] + out[-1][2] == a and out[-1][1] + out[-1][2] == b:
                    out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
                else:
                    out.append((a, b, n))
            return out

        assert runs(have) == runs(want)
    # read as runs of neighbouring chunks (while other fills run): the same bytes land in the same places
    busy = chunk * rng.choice([2, 4])
    merged, i = [], 0
    while i < len(chunks):
        j = run_end(chunks, i, chunk, busy)
        m = merge_chunks(chunks[i:j])
        start, length, _ = m.direct_span()
        assert start >= chunks[i].offset // chunk * chunk and start + length <= chunks[i].offset // chunk * chunk + busy
        merged.append(m)
        i = j
    assert sum(m.nbytes for m in merged) == sum(c.nbytes for c in chunks)
    assert sum(len(m.pieces) for m in merged) <= sum(len(c.pieces) for c in chunks)
    remapped = sorted((m.file, m.offset + p.src, p.offset, p.length) for m in merged for p in m.pieces)
    for f in got:
        assert runs([(a, b, n) for ff, a, b, n in remapped if ff == f]) == runs(sorted(got[f]))


def test_check_plan_rejects_copies_outside_allocations():
    chunks = [ReadChunk(0, 0, 100, (Piece(0, 0, 50, 100),))]
    with pytest.raises(InvalidArgument):
        check_plan(chunks, [120])
    check_plan(chunks, [150])
    with pytest.raises(InvalidArgument):
        check_plan(chunks, [])
    with pytest.raises(InvalidArgument):
        plan_chunks([], chunk_size=1000)


def test_settings_are_checked_when_made():
    for bad in (
        dict(read_mode="mmap"),
        dict(engine="fast"),
        dict(gds="maybe"),
        dict(chunk_size=1000),
        dict(chunk_size=0),
        dict(threads=0),
        dict(ring_depth=0),
        dict(busy_chunk_size=0),
        dict(ring_memory="hugetlb"),
        dict(direct_chunk_size=1000),
    ):
        with pytest.raises(InvalidArgument):
            LoaderSettings(**bad)


def test_the_path_resolves_defaults_from_the_cores():
    assert [default_threads(c) for c in (2, 8, 16, 32, 128)] == [4, 4, 12, 16, 16]
    p = choose(LoaderSettings(gds="off"), cores=16, real_driver=False)
    assert (p.source, p.read_mode, p.threads, p.depth, p.chunk_size, p.busy_chunk) == (
        "bounce",
        "auto",
        12,
        2,
        4 * MiB,
        16 * MiB,
    )
    assert p.describe() == "auto ring 12 threads x 2 x 4MiB (16MiB while other fills run)"
    p = choose(
        LoaderSettings(read_mode="odirect", chunk_size=32 * MiB, threads=5, ring_depth=3, gds="off"),
        cores=64,
        real_driver=False,
    )
    assert (p.read_mode, p.chunk_size, p.threads, p.depth, p.busy_chunk) == ("odirect", 32 * MiB, 5, 3, 32 * MiB)
    assert p.describe() == "odirect ring 5 threads x 3 x 32MiB"
    assert p.engine == "python" and p.slot_size == 32 * MiB
    # the python workers' slot holds a run of chunks (whole grid windows); the native engine's one chunk
    p = choose(LoaderSettings(chunk_size=64 * 1024, busy_chunk_size=200 * 1024, gds="off"), cores=8, real_driver=False)
    assert (p.busy_chunk, p.slot_size) == (192 * 1024, 192 * 1024)


def test_one_fill_alone_keeps_its_ring_and_fills_at_once_share_the_cores():
    s = FillScheduler(cores=32)
    with s.fill() as at_once:
        assert at_once == 1 and s.readers(16, at_once) == 16 and not s.others_running()
    # an equal share of 3/4 of the cores less the spare ones, at least 4, never more than the ring has
    assert [s.readers(16, k) for k in (2, 3, 8)] == [10, 7, 4]
    assert FillScheduler(cores=128).readers(16, 8) == 11
    assert FillScheduler(cores=16).readers(12, 2) == 4
    assert FillScheduler(cores=16).readers(2, 4) == 2
    assert FillScheduler(cores=32, share_cores=False).readers(16, 2) == 16


def test_fills_announced_together_count_each_other_from_the_first_start():
    s = FillScheduler(cores=32)
    with s.announce([0, 1]):
        with s.fill() as at_once:  # the first rank to start already knows the second is coming
            assert at_once == 2 and s.readers(16, at_once) == 10
    with s.announce([0, 0]):  # two ranks on one GPU take turns on its ring: they count once
        with s.fill() as at_once:
            assert at_once == 1
    with s.fill() as first:  # fills that were not announced count once they run
        with s.fill() as second:
            assert (first, second) == (1, 2) and s.others_running()
        assert not s.others_running()
    with pytest.raises(RuntimeError):
        with s.announce([0, 1, 2]):
            raise RuntimeError("a rank failed")
    with s.fill() as at_once:
        assert at_once == 1, "an announcement is withdrawn even when its block raises"


def test_backend_announces_the_devices_that_fill_at_once(fake):
    b = make_backend()
    with b.concurrent_fills([0, 1]):
        with b.scheduler.fill() as at_once:
            assert at_once == 2
    with b.concurrent_fills([0, 0]):
        with b.scheduler.fill() as at_once:
            assert at_once == 1


def test_cpulist_and_numa_from_sys(tmp_path, fake):
    assert cuda_driver.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert cuda_driver.parse_cpulist("") == []
    root = tmp_path / "sys"
    for n, cpus in ((0, "0-1"), (1, "2-3")):
        d = root / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    dev = root / "bus/pci/devices/0000:1c:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("1\n")
    node, cpus = cuda_driver.numa_cpus(1, sys_root=str(root))  # fake device 1 is 0000:1C:00.0
    assert node == 1 and set(cpus) <= {2, 3}
    assert cuda_driver.numa_cpus(0, sys_root=str(root)) == (None, [])  # no such PCI device in the tree
    (root / "devices/system/node/node1/cpulist").unlink()
    assert cuda_driver.numa_cpus(1, sys_root=str(root)) == (None, [])


# --- the driver layer ---------------------------------------------------------------------------------


def test_check_unpacks_and_maps_errors(fake):
    assert cuda_driver.check((CUresult.CUDA_SUCCESS,), "op") is None
    assert cuda_driver.check((0, 5), "op") == 5
    assert cuda_driver.check((0, 5, 6), "op") == (5, 6)
    with pytest.raises(CudaError) as ei:
        cuda_driver.check((CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemCreate", device=1)
    e = ei.value
    assert (e.op, e.code) == ("cuMemCreate", 2)
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(e) and "device=1" in str(e)
    assert e.details["error"] == "CUDA_ERROR_OUT_OF_MEMORY"
    with pytest.raises(CudaError) as ei:
        cuda_driver.check((12345,), "cuThing")
    assert "CUresult 12345" in str(ei.value)
    with pytest.raises(BackendError):
        cuda_driver.check(7, "cuOdd")


def test_device_count_is_zero_without_driver_or_device():
    previous = cuda_import.set_driver(FakeDriver(no_driver=True))
    try:
        assert cuda_driver.device_count() == 0
        assert "cannot be loaded" in cuda_driver.unavailable_reason()
        cuda_import.set_driver(FakeDriver(devices=0))
        assert cuda_driver.device_count() == 0
        cuda_import.set_driver(FakeDriver(devices=3))
        assert cuda_driver.device_count() == 3
    finally:
        cuda_import.set_driver(previous)


def test_without_cuda_bindings_nothing_breaks():
    import importlib.util

    if importlib.util.find_spec("cuda") is not None:
        pytest.skip("cuda-bindings is installed here")
    previous = cuda_import.set_driver(None)
    try:
        assert cuda_driver.device_count() == 0
        with pytest.raises(BackendError, match="cuda-bindings"):
            make_backend()
        from hotweightsd.backends import create_backend

        assert create_backend("auto", reserve=0).name == "cpu"
    finally:
        cuda_import.set_driver(previous)


def test_context_push_pop_leaves_thread_state(fake):
    with cuda_driver.current(1) as drv:
        assert drv is fake and fake.current_device() == 1
        with cuda_driver.current(0):
            assert fake.current_device() == 0
        assert fake.current_device() == 1
    assert fake._stack() == []
    assert fake.calls["cuDevicePrimaryCtxRetain"] == 2
    cuda_driver.primary_context(1)
    assert fake.calls["cuDevicePrimaryCtxRetain"] == 2, "primary contexts are retained once"


# --- the backend -------------------------------------------------------------------------------------


def test_devices_report_live_free_memory_and_reserve(fake):
    b = make_backend(reserve=4 * MiB)
    devs = b.devices()
    assert [d.index for d in devs] == [0, 1] and devs[0].name == "Fake GPU 0"
    assert devs[0].free == 60 * MiB and devs[0].total == 64 * MiB
    a = b.allocate(0, 3 * MiB, AllocationMode.FD)
    assert a.size == 4 * MiB  # rounded to the granularity
    assert b.devices()[0].free == 56 * MiB and b.devices()[1].free == 60 * MiB
    a.close()
    assert b.devices()[0].free == 60 * MiB
    assert b.shared_device is False and b.name == "cuda" and b.granularity(0) == GRAN and b.reserve == 4 * MiB
    assert a.device_bus_id == "0000:1b:00.0", "the allocation names its GPU by PCI bus id"
    assert b.allocate(1, GRAN, AllocationMode.LEGACY_IPC).device_bus_id == "0000:1c:00.0"
    b.close()


def test_admission_refuses_before_allocating(fake):
    b = make_backend(reserve=8 * MiB)
    with pytest.raises(InsufficientMemory) as ei:
        b.allocate(1, 60 * MiB, AllocationMode.FD)
    assert ei.value.details["needed"] == 60 * MiB and ei.value.details["free"] == 56 * MiB
    assert "cuMemCreate" not in fake.calls
    limited = make_backend(memory_limit=10 * MiB)
    x = limited.allocate(0, 8 * MiB, AllocationMode.FD)
    with pytest.raises(InsufficientMemory):
        limited.allocate(0, 4 * MiB, AllocationMode.FD)
    x.close()
    with pytest.raises(InvalidArgument):
        b.allocate(2, GRAN, AllocationMode.FD)


def test_driver_oom_becomes_insufficient_memory_and_leaks_nothing(fake):
    b = make_backend()
    fake.fail["cuMemCreate"] = CUresult.CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(InsufficientMemory):
        b.allocate(0, GRAN, AllocationMode.FD)
    fake.fail["cuMemMap"] = CUresult.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(CudaError) as ei:
        b.allocate(0, GRAN, AllocationMode.FD)
    assert ei.value.op == "cuMemMap"
    fake.fail["cuMemSetAccess"] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    with pytest.raises(CudaError, match="cuMemSetAccess"):
        b.allocate(0, GRAN, AllocationMode.FD)
    assert fake.phys == {} and fake.vas == {} and fake.handles == {}
    assert b.devices()[0].free == 64 * MiB


def test_vmm_export_fds_are_new_and_close_is_idempotent(fake):
    b = make_backend()
    a = b.allocate(0, GRAN, AllocationMode.FD)
    assert a.handle_type is HandleType.CUDA_VMM_FD
    f1, f2 = a.export_fd(), a.export_fd()
    assert f1 != f2 and os.fstat(f1).st_ino == os.fstat(f2).st_ino
    assert os.get_inheritable(f1) is False
    os.close(f1)
    os.close(f2)
    with pytest.raises(InvalidArgument):
        a.ipc_handle()
    a.close()
    a.close()
    assert fake.phys == {} and fake.vas == {}
    with pytest.raises(InvalidArgument):
        a.export_fd()


def test_legacy_ipc_allocation(fake):
    b = make_backend()
    a = b.allocate(1, 3 * MiB, AllocationMode.LEGACY_IPC)
    assert a.handle_type is HandleType.CUDA_IPC and a.size == 4 * MiB
    assert len(a.ipc_handle()) == 64
    with pytest.raises(InvalidArgument):
        a.export_fd()
    assert b.devices()[1].free == 60 * MiB
    a.close()
    assert fake.legacy == {} and b.devices()[1].free == 64 * MiB


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "beside-other-fills"])
@pytest.mark.parametrize("mode", ["pread", "odirect", "auto"])
def test_fill_every_read_mode_is_exact(fake, tmp_path, mode, busy):
    path = tmp_path / "m.safetensors"
    write_ckpt(path, n=40)
    rank = load_rank(path)
    b = make_backend(read_mode=mode, threads=3, chunk_size=64 * 1024, ring_depth=2, busy_chunk_size=192 * 1024)
    layout = plan_rank(rank, b.granularity(0))
    allocs = [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]
    seen = []
    lock = threading.Lock()

    def progress(n):
        with lock:
            seen.append(n)

    if busy:  # another device's fill runs meanwhile: neighbouring chunks are read as runs
        with b.scheduler.fill():
            desc = b.fill(layout, allocs, progress, threading.Event())
    else:
        desc = b.fill(layout, allocs, progress, threading.Event())
    assert desc.startswith(f"bounce: {mode} ring 3 threads x 2 x 64KiB (192KiB while other fills run) on cuda:0")
    assert ("runs of chunks: other fills ran" in desc) == busy, desc
    assert "(GDS off by configuration)" in desc
    assert sum(seen) == layout.nbytes
    check_contents(fake, layout, allocs)
    assert fake.event_flags == {int(fake.CUevent_flags.CU_EVENT_DISABLE_TIMING)}
    for a in allocs:
        a.close()
    b.close()
    assert fake.host == {} and fake.streams == 0 and fake.events == 0


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "beside-other-fills"])
@pytest.mark.parametrize("mode", ["pread", "auto"])
def test_fill_in_streams_order_is_exact_and_says_so(fake, tmp_path, mode, busy):
    path = tmp_path / "m.safetensors"
    write_ckpt(path, n=40)
    rank = load_rank(path)
    b = make_backend(read_mode=mode, read_order="streams", threads=3, chunk_size=64 * 1024, busy_chunk_size=192 * 1024)
    layout = plan_rank(rank, b.granularity(0))
    allocs = [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]
    if busy:
        with b.scheduler.fill():
            desc = b.fill(layout, allocs, lambda n: None, threading.Event())
    else:
        desc = b.fill(layout, allocs, lambda n: None, threading.Event())
    assert desc.startswith(f"bounce: {mode} ring 3 threads x 2 x 64KiB (192KiB while other fills run) on cuda:0"), desc
    assert "reads; in 3 streams" in desc, desc
    # the dealt order leaves no neighbours in the list to read as runs
    assert "runs of chunks" not in desc, desc
    assert "streams order" in b.note
    check_contents(fake, layout, allocs)
    for a in allocs:
        a.close()
    b.close()
    assert fake.host == {} and fake.streams == 0 and fake.events == 0


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "beside-other-fills"])
def test_fill_of_a_half_cached_file_reads_it_both_ways_and_is_exact(fake, tmp_path, monkeypatch, busy):
    """Read mode auto: the file's resident half is read buffered, its cold half O_DIRECT, in one fill."""
    path = Path(tempfile.mkdtemp(prefix="hw-mixed-", dir=pagecache.disk_dir(tmp_path))) / "m.safetensors"
    write_ckpt(path, n=120)
    chunk = 64 * 1024
    b = make_backend(read_mode="auto", threads=3, chunk_size=chunk, ring_depth=2, busy_chunk_size=192 * 1024)
    layout = plan_rank(load_rank(path), b.granularity(0))
    allocs = [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]
    cut = pagecache.half_cached(path, chunk)  # after the header was read (its readahead may cache more)
    reads: dict[str, list[int]] = {"buffered": [], "direct": []}
    real_exact, real_direct = files.read_exact, files.read_direct

    def exact(fd, buf, offset, p):
        reads["buffered"].append(offset)
        return real_exact(fd, buf, offset, p)

    def direct(fd, buf, chunk, p):
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        reads["direct"].append(chunk.offset)
        return real_direct(fd, buf, chunk, p)

    monkeypatch.setattr(files, "read_exact", exact)
    monkeypatch.setattr(files, "read_direct", direct)
    try:
        if busy:
            with b.scheduler.fill():
                desc = b.fill(layout, allocs, lambda n: None, threading.Event())
        else:
            desc = b.fill(layout, allocs, lambda n: None, threading.Event())
        assert "; auto: 1 mixed (" in desc, desc
        assert reads["buffered"] and reads["direct"], reads
        assert max(reads["buffered"]) < cut <= min(reads["direct"])
        check_contents(fake, layout, allocs)
    finally:
        for a in allocs:
            a.close()
        b.close()
        shutil.rmtree(path.parent)


def test_fill_two_devices_in_parallel_and_ring_reuse(fake, tmp_path):
    b = make_backend(threads=4, chunk_size=64 * 1024)
    jobs = []
    for d in (0, 1):
        path = tmp_path / f"r{d}.safetensors"
        write_ckpt(path, seed=d, n=30)
        layout = plan_rank(load_rank(path), GRAN)
        jobs.append((layout, [b.allocate(d, s, AllocationMode.FD) for s in layout.allocation_sizes]))
    b.prepare()
    rings = dict(b._rings)
    errors = []

    def run(layout, allocs):
        try:
            b.fill(layout, allocs, lambda n: None, threading.Event())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for layout, allocs in jobs:
        check_contents(fake, layout, allocs)
    assert b._rings == rings, "rings are made once per device and reused"
    assert fake.calls["cuMemHostAlloc"] == 2


def test_a_huge_page_ring_fills_exactly_says_so_and_gives_its_memory_back(fake, tmp_path):
    path = tmp_path / "m.safetensors"
    write_ckpt(path, n=40)
    layout = plan_rank(load_rank(path), GRAN)
    b = make_backend(read_mode="odirect", ring_memory="huge", threads=3, chunk_size=64 * 1024, ring_depth=2)
    allocs = [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]
    desc = b.fill(layout, allocs, lambda n: None, threading.Event())
    check_contents(fake, layout, allocs)
    assert re.search(r" on cuda:0, huge-page ring \(\d+% backed\); ", desc), desc
    assert "huge-page ring" in b.note
    ring = b.ring(0)
    assert "cuMemHostAlloc" not in fake.calls and fake.host == {}
    size = 3 * 2 * b.path.slot_size
    assert fake.registered == {ring.host_ptr: size}
    assert ring.host_ptr % hostmem.HUGE == 0
    span = [(ring.host_ptr, ring.host_ptr + size)]
    assert hostmem.huge_share(span) is not None  # mapped, and smaps reports it
    for a in allocs:
        a.close()
    b.close()
    assert fake.registered == {} and fake.streams == 0 and fake.events == 0
    assert hostmem.huge_share(span) is None, "the ring's mapping is unmapped with the backend"


def test_a_huge_page_ring_the_driver_refuses_to_register_is_unmapped(fake, monkeypatch):
    made = []
    real = hostmem.HugePages

    class Seen(real):
        def __init__(self, nbytes, touch=True):
            super().__init__(nbytes, touch)
            made.append(self)

    monkeypatch.setattr(hostmem, "HugePages", Seen)
    b = make_backend(ring_memory="huge", threads=2, chunk_size=64 * 1024)
    fake.fail["cuMemHostRegister"] = CUresult.CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(CudaError, match="cuMemHostRegister"):
        b.prepare()
    assert len(made) == 1 and made[0].ptr == 0 and made[0]._map is None, "unmapped after the refusal"
    assert fake.registered == {} and fake.streams == 0 and fake.events == 0 and b._rings == {}
    b.prepare()  # the next try makes a working ring on each device
    assert list(fake.registered.values()) == [2 * 2 * b.path.slot_size] * 2
    b.close()
    assert fake.registered == {}


def test_huge_share_reads_anon_huge_pages_of_the_overlapping_mappings(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "00400000-00600000 r-xp 00000000 08:01 1 /bin/x\n"
        "AnonHugePages:         0 kB\n"
        "7f0000000000-7f0000800000 rw-p 00000000 00:00 0\n"
        "Rss:                8192 kB\n"
        "AnonHugePages:      4096 kB\n"
        "\n"
    )
    lo = 0x7F0000000000
    assert hostmem.huge_share([(lo + 4096, lo + 8192)], smaps=str(smaps)) == 0.5
    assert hostmem.huge_share([(0x1000, 0x2000)], smaps=str(smaps)) is None
    assert hostmem.huge_share([(lo, lo + 1)], smaps=str(tmp_path / "absent")) is None
    with pytest.raises(ValueError):
        hostmem.HugePages(0)


def test_truncated_file_raises_bad_checkpoint_and_leaks_nothing(fake, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    write_ckpt(path)
    layout = plan_rank(load_rank(path), GRAN)
    for mode in ("pread", "odirect"):
        b = make_backend(read_mode=mode, threads=2, chunk_size=64 * 1024)
        before = b.devices()[0].free
        allocs = [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size - 1000)
        try:
            with pytest.raises(BadCheckpoint, match="truncated"):
                b.fill(layout, allocs, lambda n: None, threading.Event())
        finally:
            with open(path, "r+b") as f:
                f.truncate(size)
        for a in allocs:
            a.close()
        assert b.devices()[0].free == before
        b.close()
    # the file shrinking while the readers run (after the up-front size check) is caught too
    path, layout, b, allocs = prepared(tmp_path)
    real_read = files.read_exact
    calls = []

    def shrinking(fd, buf, offset, p):
        if not calls:
            os.truncate(path, 100)
        calls.append(1)
        return real_read(fd, buf, offset, p)

    monkeypatch.setattr(files, "read_exact", shrinking)
    with pytest.raises(BadCheckpoint):
        b.fill(layout, allocs, lambda n: None, threading.Event())
    for a in allocs:
        a.close()
    assert fake.phys == {}


def test_driver_failure_mid_fill_is_reported_after_streams_drain(fake, tmp_path):
    _, layout, b, allocs = prepared(tmp_path)
    fake.fail["cuMemcpyHtoDAsync"] = CUresult.CUDA_ERROR_INVALID_VALUE
    syncs = fake.calls.get("cuStreamSynchronize", 0)
    with pytest.raises(CudaError) as ei:
        b.fill(layout, allocs, lambda n: None, threading.Event())
    assert ei.value.op == "cuMemcpyHtoDAsync"
    assert fake.calls["cuStreamSynchronize"] - syncs == 2, "every worker drained its stream"
    b.fill(layout, allocs, lambda n: None, threading.Event())  # the ring is still usable
    check_contents(fake, layout, allocs)


def test_cancel_aborts(fake, tmp_path):
    _, layout, b, allocs = prepared(tmp_path)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Aborted):
        b.fill(layout, allocs, lambda n: None, cancel)


def test_fill_rejects_mismatched_allocations(fake, tmp_path):
    path = tmp_path / "m.safetensors"
    write_ckpt(path)
    layout = plan_rank(load_rank(path), GRAN)
    b = make_backend()
    with pytest.raises(InvalidArgument):
        b.fill(layout, [], lambda n: None, threading.Event())
    small = [b.allocate(0, GRAN, AllocationMode.FD)] * len(layout.allocation_sizes)
    if layout.allocation_sizes[0] > GRAN:
        with pytest.raises(InvalidArgument):
            b.fill(layout, small, lambda n: None, threading.Event())


def test_adopt_reimports_an_exported_fd(fake):
    b = make_backend()
    a = b.allocate(1, GRAN, AllocationMode.FD)
    ctypes.memmove(fake.host_address(a.address, 5), b"hello", 5)
    b2 = make_backend(memory_limit=16 * MiB)  # the restarted daemon
    adopted = b2.adopt(1, GRAN, HandleType.CUDA_VMM_FD, a.export_fd())
    assert adopted.handle_type is HandleType.CUDA_VMM_FD and adopted.device == 1
    assert fake.read(adopted.address, 5) == b"hello"
    assert b2.devices()[1].free == 14 * MiB, "adopted memory counts against the limit"
    a.close()
    assert fake.read(adopted.address, 5) == b"hello", "the adopted mapping holds the memory"
    os.close(adopted.export_fd())
    adopted.close()
    assert fake.phys == {} and fake.vas == {}

    fd = os.memfd_create("x")
    with pytest.raises(InvalidArgument, match="CUDA_VMM_FD"):
        b2.adopt(0, GRAN, HandleType.CUDA_IPC, fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # adopt owns the fd, and closed it
    c = b.allocate(0, GRAN, AllocationMode.FD)
    with pytest.raises(InvalidArgument, match="lives on cuda:0"):
        b2.adopt(1, GRAN, HandleType.CUDA_VMM_FD, c.export_fd())
    with pytest.raises(InvalidArgument, match="granularity"):
        b2.adopt(0, GRAN + 1, HandleType.CUDA_VMM_FD, c.export_fd())
    c.close()
    assert fake.phys == {} and fake.vas == {}


def test_gds_path_choice_is_never_silent(fake, monkeypatch):
    monkeypatch.setattr(gds, "nvidia_fs_devices", lambda: [])
    p = make_backend(gds="off").path
    assert (p.source, p.source_why) == ("bounce", "GDS off by configuration")
    p = make_backend(gds="auto").path
    assert (p.source, p.source_why) == ("bounce", "GDS unavailable: no /dev/nvidia-fs*")
    for required in ("on", "force"):  # a backend that cannot take the path it was told to take does not start
        with pytest.raises(BackendError, match="gds=on"):
            make_backend(gds=required)
    monkeypatch.setattr(gds, "library_reason", lambda: "libcufile cannot be loaded: nope")
    with pytest.raises(BackendError, match="compatibility mode"):
        make_backend(gds="compat")
    monkeypatch.setattr(gds, "nvidia_fs_devices", lambda: ["/dev/nvidia-fs0"])
    p = make_backend(gds="auto").path
    assert p.source == "bounce" and "libcufile" in p.source_why
    monkeypatch.setattr(gds, "library_reason", lambda: None)
    for mode in ("auto", "on", "force"):
        b = make_backend(gds=mode)
        assert (b.path.source, b.path.source_why, b.note) == ("gds", "GDS: /dev/nvidia-fs0", "GDS: /dev/nvidia-fs0")
    with pytest.raises(InvalidArgument):
        make_backend(gds="maybe")


def test_the_path_is_chosen_once_at_start(fake, tmp_path, monkeypatch):
    """A fill runs the path the backend chose when it started; nothing about it is decided again per fill."""
    monkeypatch.setattr(gds, "nvidia_fs_devices", lambda: [])
    path, layout, b, allocs = prepared(tmp_path, gds="auto")
    chosen = b.path

    def decided_again(*args, **kw):
        raise AssertionError("a fill decided the load path again")

    for module, name in (
        (gds, "unavailable_reason"),
        (gds, "library_reason"),
        (gds, "nvidia_fs_devices"),
        (native, "unavailable_reason"),
    ):
        monkeypatch.setattr(module, name, decided_again)
    desc = b.fill(layout, allocs, lambda n: None, threading.Event())
    assert b.path is chosen
    assert desc.endswith("; python workers: not the CUDA driver (a test double) (GDS unavailable: no /dev/nvidia-fs*)")
    check_contents(fake, layout, allocs)


def test_daemon_config_names(fake, monkeypatch):
    monkeypatch.setattr(gds, "nvidia_fs_devices", lambda: [])
    b = make_backend(read_mode="odirect", chunk_size=32 * MiB, ring_depth=4, threads=8, gds="auto")
    assert b.path.describe() == "odirect ring 8 threads x 4 x 32MiB"
    assert b.note == (
        "bounce path (odirect ring 8 threads x 4 x 32MiB, cuMemHostAlloc ring; python workers: not the CUDA "
        "driver (a test double)): "
        "GDS unavailable: no /dev/nvidia-fs*"
    )
    assert make_backend(read_mode="auto").path.read_mode == "auto"  # decided per file when a fill opens it
    # the native engine asked for where it cannot run (here: a driver double) stops the backend at start
    with pytest.raises(BackendError, match="native loader engine was asked for, but not the CUDA driver"):
        make_backend(engine="native")
    from hotweightsd.backends import create_backend
    from hotweightsd.config import load_config

    cfg = load_config(env={"HOTWEIGHTS_LOADER_ENGINE": "python"})
    b = create_backend("cuda", reserve=0, loader=cfg.loader_settings())
    assert b.path.engine == "python" and b.path.engine_why == "python workers by configuration"


# --- the client side ----------------------------------------------------------------------------------


def test_device_mapping_undoes_once():
    calls = []
    m = cuda_import.DeviceMapping(0x1000, 4096, 0, lambda: calls.append(1))
    cai = m.__cuda_array_interface__
    assert cai["shape"] == (4096,) and cai["typestr"] == "|u1" and cai["data"] == (0x1000, False)
    m.release()
    m.release()
    assert calls == [1] and m.released
    m2 = cuda_import.DeviceMapping(0x2000, 1, 0, lambda: calls.append(2))
    del m2
    assert calls == [1, 2]


def test_open_region_argument_errors(fake):
    with pytest.raises(InvalidArgument):
        cuda_import.open_region("CUDA_VMM_FD", GRAN, 0, None)
    with pytest.raises(InvalidArgument):
        cuda_import.open_region("CUDA_IPC", GRAN, 0, None, b"short")
    with pytest.raises(InvalidArgument):
        cuda_import.open_region("MEMFD", GRAN, 0, 3)


def test_client_mapping_unmaps_when_released(fake, monkeypatch):
    """open_vmm: import + read-only map + handle released at once; the mapping ends on release."""
    b = make_backend()
    a = b.allocate(0, GRAN, AllocationMode.FD)
    fd = a.export_fd()
    made = {}

    def fake_tensor(mapping):
        made["m"] = mapping
        return torch.empty(mapping.size, dtype=torch.uint8)

    monkeypatch.setattr(cuda_import, "_tensor_over", fake_tensor)
    region = cuda_import.open_region("CUDA_VMM_FD", GRAN, 0, fd)
    os.close(fd)
    va = made["m"].ptr
    assert fake.vas[va]["access"] == FakeDriver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
    assert region.writable is False and region.size == GRAN
    a.close()
    assert len(fake.phys) == 1, "the client's mapping keeps the memory alive after the exporter closes"
    region.close()
    made.pop("m").release()
    assert fake.phys == {} and fake.vas == {}

    # a driver that refuses read-only mappings fails the attach, saying why: never a writable mapping unasked
    a = b.allocate(0, GRAN, AllocationMode.FD)
    fd = a.export_fd()
    vas_before = dict(fake.vas)
    fake.fail["cuMemSetAccess"] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    monkeypatch.delenv("HOTWEIGHTS_CUDA_WRITABLE", raising=False)
    with pytest.raises(CudaError, match="refused a read-only mapping") as caught:
        cuda_import.open_region("CUDA_VMM_FD", GRAN, 0, fd)
    assert "HOTWEIGHTS_CUDA_WRITABLE=1" in str(caught.value) and "m" not in made
    assert fake.vas == vas_before, "the refused mapping was not undone"
    # the operator's explicit choice maps read-write
    monkeypatch.setenv("HOTWEIGHTS_CUDA_WRITABLE", "1")
    region = cuda_import.open_region("CUDA_VMM_FD", GRAN, 0, fd)
    os.close(fd)
    assert region.writable is True
    read_write = FakeDriver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    assert fake.vas[made["m"].ptr]["access"] == read_write
    made.pop("m").release()
    a.close()
    assert fake.phys == {}


def test_gds_compat_fill_is_exact_and_releases_everything(fake, fake_cufile, tmp_path):
    path, layout, b, allocs = prepared(tmp_path, gds="compat")
    before = fds_under(tmp_path)
    desc = b.fill(layout, allocs, lambda n: None, threading.Event())
    assert desc.startswith("gds: cuFile compatibility mode (forced), 2 threads"), desc
    assert "0/1 files O_DIRECT" in desc, "compatibility mode reads a buffered fd"
    check_contents(fake, layout, allocs)
    assert fake_cufile.env_at_open == {"CUFILE_FORCE_COMPAT_MODE": "true", "CUFILE_ALLOW_COMPAT_MODE": "true"}
    assert fake_cufile.params == {1: True, 2: True}
    assert fake_cufile.handles == {} and fds_under(tmp_path) == before
    assert fake._stack() == [], "the calling thread's contexts are as they were"
    for a in allocs:
        a.close()
    b.close()


def test_gds_refused_registration_names_the_filesystem_and_leaks_nothing(fake, fake_cufile, tmp_path, monkeypatch):
    path, layout, b, allocs = prepared(tmp_path, gds="compat")
    st = os.stat(path)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 1 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / / rw - overlay overlay rw\n")
    monkeypatch.setattr(gds, "MOUNTINFO", str(mountinfo))
    monkeypatch.setattr(gds, "UDEV_DIR", str(tmp_path / "no-udev"))
    fake_cufile.refuse = 5027
    before = fds_under(tmp_path)
    with pytest.raises(BackendError) as info:
        b.fill(layout, allocs, lambda n: None, threading.Event())
    exc = info.value
    assert exc.op == "cuFileHandleRegister" and exc.code == 5027
    assert str(path) in exc.message and "cuFile 1.15" in exc.message and "overlay" in exc.message
    assert "no-udev is not visible" in exc.message and "gds=auto or gds=off" in exc.message
    assert exc.details["known_obstacle"] is True and exc.details["filesystem"] == "overlay"
    assert fake_cufile.handles == {} and fds_under(tmp_path) == before
    for a in allocs:
        a.close()
    b.close()


def test_file_storage_reads_mountinfo(tmp_path, monkeypatch):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"0")
    st = os.stat(f)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    mount = str(tmp_path).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"1 0 {dev} / / rw shared:1 - ext4 /dev/vda rw\n"
        f"2 1 9:9 / {mount} rw - tmpfs tmpfs rw\n"
        f"3 1 {dev} /sub {mount} rw master:2 - xfs /dev/sdb\\0401 rw\n"
    )
    monkeypatch.setattr(gds, "MOUNTINFO", str(mountinfo))
    monkeypatch.setattr(gds, "UDEV_DIR", str(tmp_path))
    assert gds.file_storage(str(f)) == {"dev": dev, "fstype": "xfs", "mount": str(tmp_path), "source": "/dev/sdb 1"}
    assert gds.registration_obstacles(str(f)) == []
    monkeypatch.setattr(
        gds, "file_storage", lambda p: {"dev": "0:53", "fstype": "overlay", "mount": "/", "source": "overlay"}
    )
    (why,) = gds.registration_obstacles(str(f))
    assert "overlay" in why and "without a block device" in why


def test_clients_find_the_gpu_by_pci_bus_id_not_by_ordinal(fake, monkeypatch):
    """A serving process with its own CUDA_VISIBLE_DEVICES numbers GPUs differently from the daemon."""
    from hotweights.errors import InvalidArgument

    monkeypatch.setattr(cuda_import, "_local_ordinals", {})
    assert cuda_import.pci_bus_id(1) == "0000:1c:00.0"
    assert cuda_import.local_device("0000:1C:00.0", daemon_ordinal=5) == 1
    assert cuda_import.local_device("", daemon_ordinal=5) == 5  # an older daemon sends no bus id
    with pytest.raises(InvalidArgument, match="CUDA_VISIBLE_DEVICES"):
        cuda_import.local_device("0000:99:00.0", daemon_ordinal=0)
