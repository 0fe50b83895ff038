"""The cuda backend on a real GPU: allocate, fill, export, import in another process, and its failure paths.

Run with ``python3 -m pytest -m gpu -q tests/gpu``; skipped (with the reason) without a GPU or cuda-bindings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import (
    HERE,
    MiB,
    assert_loaded_exactly,
    backend,
    child_env,
    free_memory,
    gpu_count,
    load,
    placements_json,
    run_child,
    write_checkpoint,
)

from hotweights.testing import read_line, wait_until
from support import GDS_TEST_DIR

pytestmark = pytest.mark.gpu

SLACK = 32 * MiB  # cuMemGetInfo noise (driver bookkeeping) allowed when checking that memory came back


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), ranks=max(1, min(2, gpu_count())), parts=2)


@pytest.fixture(scope="module")
def b():
    be = backend()
    be.prepare()  # pinned rings and streams exist before any free-memory baseline is taken
    yield be
    be.close()


@contextlib.contextmanager
def loaded_by(ckpt, **settings):
    """(layout, allocations, description) of rank 0 loaded by a backend of its own with ``settings``; the
    allocations and the backend are closed on the way out, whatever the test asserted."""
    with contextlib.ExitStack() as stack:
        be = backend(**settings)
        stack.callback(be.close)
        layout, allocs, desc = load(be, ckpt)
        for a in allocs:  # closed before the backend, each whatever the others did
            stack.callback(a.close)
        yield layout, allocs, desc


def region_spec(allocs, fds=None) -> list[dict]:
    out = []
    for i, a in enumerate(allocs):
        r = {"handle_type": a.handle_type.value, "size": a.size, "device": a.device}
        if fds is not None:
            r["fd"] = fds[i]
        else:
            r["ipc_handle"] = a.ipc_handle().hex()
        out.append(r)
    return out


def verify_in_child(layout, allocs, legacy=False, **extra) -> dict:
    fds = None if legacy else [a.export_fd() for a in allocs]
    spec = {
        "regions": region_spec(allocs, fds),
        "placements": placements_json(layout),
        "files": layout.files,
        "file_devices": [allocs[0].device] * len(layout.files),
        **extra,
    }
    try:
        return run_child("verify", spec, pass_fds=tuple(fds or ()))
    finally:
        for fd in fds or ():
            os.close(fd)


def test_vmm_load_is_bit_exact_in_another_process(b, ckpt):
    """allocate + fill + export_fd; a separate process imports, maps, builds tensors, compares with safetensors."""
    layout, allocs, desc = load(b, ckpt)
    try:
        assert desc.startswith("bounce: auto ring"), desc
        assert f"; auto: {len(layout.files)} buffered," in desc, desc  # just written: in the page cache
        assert "GDS off by configuration" in desc
        assert_loaded_exactly(layout, allocs)
        out = verify_in_child(layout, allocs, write_probe=True)
        assert out["mismatch"] == [] and out["ok"] == len(layout.placements)
        assert set(out["devices"]) == {0}
        if out["writable"][0]:
            print("NOTE: the driver refused a read-only mapping; clients map weights read-write here")
        else:
            assert out["write_blocked"], "a write through a read-only mapping went through"
    finally:
        for a in allocs:
            a.close()


def test_odirect_read_mode_is_exact(ckpt):
    with loaded_by(ckpt, read_mode="odirect", threads=4, chunk_size=1 * MiB) as (layout, allocs, desc):
        assert desc.startswith("bounce: odirect ring 4 threads x 2 x 1MiB"), desc
        assert_loaded_exactly(layout, allocs)


def test_auto_runs_the_native_engine_where_it_was_built(b, ckpt):
    """Where the native loop is built (pip install, or gpu_session.sh), ``auto`` must pick it: a build that
    silently fell back to the python workers would go unnoticed in every other test."""
    from hotweightsd.loaders import native

    layout, allocs, desc = load(b, ckpt)
    try:
        if native.unavailable_reason() is None:
            assert "native engine" in desc, desc
        else:
            assert f"python workers: {native.unavailable_reason()}" in desc, desc
        assert_loaded_exactly(layout, allocs)
    finally:
        for a in allocs:
            a.close()


def test_auto_reads_cold_files_direct_and_exactly(ckpt):
    """Read mode auto on files whose pages were dropped: O_DIRECT for each, on whichever engine runs."""
    for path in Path(ckpt).glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    with loaded_by(ckpt, read_mode="auto", threads=4, chunk_size=1 * MiB) as (layout, allocs, desc):
        if f"; auto: {len(layout.files)} buffered," in desc:
            pytest.skip(f"this filesystem kept the pages (memory or no O_DIRECT): {desc}")
        assert f"; auto: {len(layout.files)} O_DIRECT," in desc, desc
        assert_loaded_exactly(layout, allocs)


def test_auto_reads_half_cached_files_both_ways_and_exactly(ckpt):
    """Read mode auto on files half in the page cache: each read through both its fds, on whichever engine runs."""
    from hotweights.format.checkpoint import open_checkpoint
    from support import pagecache

    chunk = 256 * 1024
    open_checkpoint(ckpt)  # its header reads (and their readahead) come before the pages are placed
    paths = sorted(Path(ckpt).glob("model-rank-0-*.safetensors"))
    for path in paths:
        pagecache.half_cached(path, chunk)
    with loaded_by(ckpt, read_mode="auto", threads=4, chunk_size=chunk) as (layout, allocs, desc):
        assert f"; auto: {len(paths)} mixed (" in desc, desc
        assert_loaded_exactly(layout, allocs)


@pytest.mark.parametrize(
    "engine,mode", [("native", "pread"), ("native", "odirect"), ("python", "pread"), ("python", "odirect")]
)
def test_both_engines_are_exact(ckpt, engine, mode):
    """Each engine, asked for by name, loads the same bytes (small chunks: many reads and copies per tensor)."""
    from hotweightsd.loaders import native

    if engine == "native" and native.unavailable_reason():
        pytest.skip(f"native loader: {native.unavailable_reason()}")
    with loaded_by(ckpt, read_mode=mode, threads=5, chunk_size=256 * 1024, engine=engine) as (layout, allocs, desc):
        assert desc.startswith(f"bounce: {mode} ring 5 threads x 2 x 256KiB"), desc
        assert ("native engine" in desc) == (engine == "native"), desc
        # the native engine says where its readers' time went (the copies' share among it)
        assert (re.search(r"readers \d+% reading, \d+% waiting on copies", desc) is not None) == (engine == "native")
        assert_loaded_exactly(layout, allocs)


@pytest.mark.parametrize("memory", ["huge", "driver"])
def test_each_ring_memory_is_exact(ckpt, memory):
    """The ring in huge pages registered with the driver, or in the driver's own pinned memory: the same bytes,
    O_DIRECT reads landing in it and copies leaving it."""
    with loaded_by(ckpt, read_mode="odirect", threads=4, chunk_size=1 * MiB, ring_memory=memory) as (
        layout,
        allocs,
        desc,
    ):
        said = " on cuda:0, huge-page ring (" if memory == "huge" else " on cuda:0, cuMemHostAlloc ring;"
        assert said in desc, desc
        assert_loaded_exactly(layout, allocs)


def test_free_memory_returns_after_close(b, tmp_path):
    """Memory comes back when the daemon closes it, but only once no importer maps it any more."""
    import torch

    from hotweightsd.core.backend import AllocationMode

    big = tmp_path / "big"
    write_checkpoint(big, ranks=1, parts=1, scale=64)  # ~ 270 MB
    before = free_memory(0)
    layout, allocs, _ = load(b, big)
    extra = b.allocate(0, 512 * MiB, AllocationMode.FD)
    used = sum(a.size for a in allocs) + extra.size
    assert free_memory(0) <= before - used + SLACK
    # an importer keeps the memory alive after the daemon's close ...
    fds = [a.export_fd() for a in allocs]
    child = subprocess.Popen(
        [sys.executable, "-c", IMPORT_AND_WAIT, json.dumps(region_spec(allocs, fds))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=fds,
        env=child_env(),
    )
    try:
        for fd in fds:
            os.close(fd)
        assert read_line(child, what='"mapped" from the importer').strip() == "mapped"
        for a in allocs:
            a.close()
        extra.close()
        assert free_memory(0) <= before - sum(a.size for a in allocs) + SLACK, "freed under a live mapping"
        # ... and it comes back when the importer lets go
        child.stdin.write("release\n")
        child.stdin.flush()
        assert read_line(child, what='"released" from the importer').strip() == "released"
    finally:
        child.kill()
        child.wait()
    torch.cuda.synchronize()
    wait_until(
        lambda: free_memory(0) >= before - SLACK,
        what="the freed memory to come back",
        interval=0.1,
        context=lambda: f"{(before - free_memory(0)) / MiB:.1f} MiB did not come back",
    )


IMPORT_AND_WAIT = """
import gc, json, os, sys, torch
from hotweights.mapping.regions import open_region
spec = json.loads(sys.argv[1])
regions = [open_region(r["handle_type"], r["size"], r["device"], r["fd"]) for r in spec]
for r in spec:
    os.close(r["fd"])
view = regions[0].base[:1024].view(torch.float32)  # a tensor that outlives region.close()
for rg in regions:
    rg.close()
print("mapped", flush=True)
sys.stdin.readline()
del view, regions
gc.collect()
torch.cuda.synchronize()
print("released", flush=True)
sys.stdin.readline()
"""


def test_truncated_file_raises_bad_checkpoint_and_leaks_nothing(b, tmp_path):
    from hotweights.errors import BadCheckpoint
    from hotweights.format.checkpoint import open_checkpoint
    from hotweightsd.core.backend import AllocationMode
    from hotweightsd.core.layout import plan_rank

    ck = write_checkpoint(tmp_path / "t", ranks=1, parts=2, scale=64)
    layout = plan_rank(open_checkpoint(ck).ranks[0], b.granularity(0))
    before = free_memory(0)
    allocs = [b.allocate(0, s, AllocationMode.FD) for s in layout.allocation_sizes]
    victim = layout.files[-1]
    os.truncate(victim, os.path.getsize(victim) - 4096)
    with pytest.raises(BadCheckpoint, match="truncated"):
        b.fill(layout, allocs, lambda n: None, threading.Event())
    for a in allocs:
        a.close()
    assert free_memory(0) >= before - SLACK
    # and the backend still loads afterwards
    write_checkpoint(ck, ranks=1, parts=2, scale=64)
    layout2, allocs2, _ = load(b, ck)
    assert_loaded_exactly(layout2, allocs2)
    for a in allocs2:
        a.close()


def test_admission_refuses_what_does_not_fit_before_reading(b, ckpt):
    from hotweights.errors import InsufficientMemory
    from hotweightsd.core.backend import AllocationMode

    free = b.devices()[0].free
    before = free_memory(0)
    with pytest.raises(InsufficientMemory) as ei:
        b.allocate(0, free + 64 * MiB, AllocationMode.FD)
    assert ei.value.details["needed"] >= free + 64 * MiB and ei.value.details["free"] <= free + SLACK
    assert free_memory(0) >= before - SLACK
    tight = backend(reserve=before - 4 * MiB)  # leaves ~4 MiB admissible: the checkpoint cannot fit
    try:
        with pytest.raises(InsufficientMemory):
            load(tight, ckpt)
        assert free_memory(0) >= before - SLACK
    finally:
        tight.close()


def test_legacy_ipc_mode(b, ckpt):
    from hotweightsd.core.backend import AllocationMode, HandleType

    layout, allocs, _ = load(b, ckpt, mode=AllocationMode.LEGACY_IPC)
    try:
        assert all(a.handle_type is HandleType.CUDA_IPC and len(a.ipc_handle()) == 64 for a in allocs)
        assert_loaded_exactly(layout, allocs)
        out = verify_in_child(layout, allocs, legacy=True, compute=True)
        assert out["mismatch"] == [] and out["ok"] == len(layout.placements)
    finally:
        for a in allocs:
            a.close()


def test_client_keeps_computing_after_exporter_is_killed(ckpt):
    """The exporter (a CudaBackend in another process) is SIGKILLed; this process's VMM mapping stays valid."""
    import torch
    from safetensors.torch import load_file

    from hotweights.mapping.regions import open_region

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_child.py"), "exporter"],
        stdin=subprocess.PIPE,
        pass_fds=(theirs.fileno(),),
        env=child_env(),
        text=True,
    )
    theirs_fd = theirs.fileno()
    proc.stdin.write(json.dumps({"checkpoint": str(ckpt), "socket_fd": theirs_fd}))
    proc.stdin.close()
    theirs.close()
    try:
        ours.settimeout(120)
        n = int.from_bytes(_recv_exact(ours, 8), "little")
        data, fds, _, _ = socket.recv_fds(ours, n, 64)
        while len(data) < n:
            data += ours.recv(n - len(data))
        msg = json.loads(data)
        regions = [open_region(r["handle_type"], r["size"], r["device"], fd) for r, fd in zip(msg["regions"], fds)]
        for fd in fds:
            os.close(fd)
        from _child import build

        tensors = {p["name"]: build(regions[p["allocation"]].base, p) for p in msg["placements"]}
        refs = {}
        for f in msg["files"]:
            refs.update(load_file(f, device="cuda:0"))
        x = torch.randn(64, 1024, device="cuda:0")
        want = x @ refs["p0.big"]
        assert torch.equal(x @ tensors["p0.big"], want)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        for _ in range(3):
            got = x @ tensors["p0.big"]
            torch.cuda.synchronize()
            assert torch.equal(got, want)
        assert torch.equal(tensors["p1.big_bf16"], refs["p1.big_bf16"])
        del tensors, got, regions
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()


def _recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError("the exporter closed the socket")
        buf += chunk
    return buf


def test_adopt_after_restart(b, ckpt):
    """The daemon's own references go; a new process adopts the fd (as after a restart) and finds the data."""
    layout, allocs, _ = load(b, ckpt)
    fds = [a.export_fd() for a in allocs]
    regions = [
        {"handle_type": a.handle_type.value, "size": a.size, "device": a.device, "fd": fd} for a, fd in zip(allocs, fds)
    ]
    for a in allocs:
        a.close()  # only the fds keep the memory now
    placements = [dict(p, file_offset=lp.file_offset) for p, lp in zip(placements_json(layout), layout.placements)]
    try:
        out = run_child(
            "adopt", {"regions": regions, "placements": placements, "files": layout.files}, pass_fds=tuple(fds)
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert out["adopted"] == len(allocs)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_two_ranks_on_two_gpus_at_once(b, ckpt):
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = load(b, ckpt, rank=rank)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    try:
        for rank, (layout, allocs, desc) in results.items():
            assert f"on cuda:{rank}" in desc and all(a.device == rank for a in allocs)
            out = verify_in_child(layout, allocs)
            assert out["mismatch"] == [] and set(out["devices"]) == {rank}
    finally:
        for _, allocs, _ in results.values():
            for a in allocs:
                a.close()


def test_gds_compatibility_mode_is_exact(tmp_path):
    """cuFile's compatibility mode (no nvidia-fs needed) loads a checkpoint bit-exactly.

    cuFile registers only files it can trace to a block device (see loaders/gds.py): the checkpoint
    goes under HOTWEIGHTS_GDS_TEST_DIR when set, else under pytest's tmp dir or, where that has no
    block device (the overlayfs or tmpfs /tmp of a container), beside these tests. Where cuFile
    still refuses the files for a known reason of the machine, the test is skipped with that reason.
    """
    from hotweights.errors import BackendError
    from hotweightsd.loaders import gds

    reason = gds.library_reason()
    if reason:
        pytest.skip(f"cuFile is not usable here: {reason}")
    chosen = GDS_TEST_DIR
    candidates = [Path(chosen)] if chosen else [tmp_path, HERE]
    parent = next((c for c in candidates if not gds.registration_obstacles(str(c))), candidates[0])
    directory = Path(tempfile.mkdtemp(prefix="gds-ckpt-", dir=parent))
    be = backend(gds="compat", threads=4)
    try:
        ckpt = write_checkpoint(directory, ranks=1, parts=2)
        try:
            layout, allocs, desc = load(be, ckpt)
        except BackendError as exc:
            if exc.op == "cuFileHandleRegister" and exc.details.get("known_obstacle"):
                pytest.skip(f"cuFile cannot register files here: {exc.message}")
            raise
        try:
            assert desc.startswith("gds: cuFile compatibility mode (forced)"), desc
            assert_loaded_exactly(layout, allocs)
        finally:
            for a in allocs:
                a.close()
    finally:
        be.close()
        shutil.rmtree(directory, ignore_errors=True)
