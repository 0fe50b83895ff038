#!/usr/bin/env python3
"""What it costs to DMA straight from the source's pages (no host copy) on a GPU machine.

The bounce path copies every byte on the host (page cache -> pinned ring) before the GPU reads it, so
host memory carries each byte three times. A path without that copy must pin the source's pages
(``cuMemHostRegister``) instead, and is only worth having if pinning is cheap. This probe measures,
for a region of ``--gb`` GB of each kind of memory:

- ``populate_s``: ``MADV_POPULATE_READ`` of a file mapping (page-table entries only);
- ``register_s`` / ``unregister_s``: ``cuMemHostRegister`` of the whole region, one call;
- ``register_par_s``: the same region registered by ``--threads`` threads, a slice each;
- ``dma_gbps``: host -> device copy rate out of the registered region;

for anonymous memory (4 KiB pages and transparent huge pages), a file in the page cache (the
checkpoint's disk), a file in /dev/shm, and a file in a tmpfs mounted ``huge=always`` (made here when
run as root). Then it loads a checkpoint with the cuda backend's ``mmap`` mode (register + DMA per chunk)
and its ``pread`` ring from page cache and from each tmpfs, to see the whole path.

Writes ``probe-<gpu>-<date>.json`` into each ``--out``. Rates are GB/s (1e9 bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl

MiB = bl.MiB
HUGE = 2 * MiB
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def meminfo(*keys: str) -> dict:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0])
    return out


def map_region(kind: str, size: int, path: Path | None) -> tuple[int, int, int | None]:
    """(address, length, fd) of a populated region of ``kind``."""
    if kind.startswith("anon"):
        span = size + HUGE
        raw = libc.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        base = -(-raw // HUGE) * HUGE
        if kind == "anon-thp":
            libc.madvise(base, size, MADV_HUGEPAGE)
        ctypes.memset(base, 3, size)
        return base, size, None
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    return addr, size, fd


def write_file(path: Path, size: int) -> None:
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(block[: min(left, len(block))])


def probe_region(kind: str, size: int, path: Path | None, threads: int) -> dict:
    from hotweights.cuda import devices as cd

    out: dict = {"kind": kind, "bytes": size}
    before = meminfo("AnonHugePages", "ShmemHugePages", "FileHugePages", "ShmemPmdMapped", "FilePmdMapped")
    addr, length, fd = map_region(kind, size, path)
    try:
        if fd is not None:
            t0 = time.perf_counter()
            rc = libc.madvise(addr, length, MADV_POPULATE_READ)
            out["populate_s"] = round(time.perf_counter() - t0, 4)
            out["populate_rc"] = rc
        out["meminfo_delta_kb"] = {k: v - before.get(k, 0) for k, v in meminfo(*before).items()}
        with cd.current(0) as drv:
            flags = int(drv.CU_MEMHOSTREGISTER_PORTABLE)
            if fd is not None:
                flags |= int(drv.CU_MEMHOSTREGISTER_READ_ONLY)
            t0 = time.perf_counter()
            cd.check(drv.cuMemHostRegister(addr, length, flags), "cuMemHostRegister")
            out["register_s"] = round(time.perf_counter() - t0, 4)
            out["register_gbps"] = bl.rate(length, out["register_s"])
            dev = int(cd.check(drv.cuMemAlloc(length), "cuMemAlloc"))
            streams = [cd.check(drv.cuStreamCreate(1), "cuStreamCreate") for _ in range(2)]
            try:
                piece = 256 * MiB
                for rep in range(2):  # the first pass warms the GPU mappings
                    t0 = time.perf_counter()
                    for i, off in enumerate(range(0, length, piece)):
                        cd.check(
                            drv.cuMemcpyHtoDAsync(dev + off, addr + off, min(piece, length - off), streams[i % 2]),
                            "cuMemcpyHtoDAsync",
                        )
                    for st in streams:
                        cd.check(drv.cuStreamSynchronize(st), "cuStreamSynchronize")
                    out[f"dma_gbps_{rep}"] = bl.rate(length, time.perf_counter() - t0)
            finally:
                for st in streams:
                    drv.cuStreamDestroy(st)
                drv.cuMemFree(dev)
            t0 = time.perf_counter()
            cd.check(drv.cuMemHostUnregister(addr), "cuMemHostUnregister")
            out["unregister_s"] = round(time.perf_counter() - t0, 4)

        # the same region by several threads, a slice each (does the driver serialize?)
        step = -(-length // threads // HUGE) * HUGE
        slices = [(addr + o, min(step, length - o)) for o in range(0, length, step)]
        errs = []

        def reg(a, n):
            try:
                with cd.current(0) as drv2:
                    cd.check(drv2.cuMemHostRegister(a, n, flags), "cuMemHostRegister")
            except Exception as exc:
                errs.append(exc)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=reg, args=s) for s in slices]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out["register_par_s"] = round(time.perf_counter() - t0, 4)
        out["register_par_gbps"] = bl.rate(length, out["register_par_s"])
        if errs:
            out["register_par_error"] = str(errs[0])
        with cd.current(0) as drv:
            t0 = time.perf_counter()
            for a, _ in slices:
                drv.cuMemHostUnregister(a)
            out["unregister_par_s"] = round(time.perf_counter() - t0, 4)
    finally:
        libc.munmap(addr, length)
        if fd is not None:
            os.close(fd)
    return out


def loads(ckpt_dirs: dict[str, Path], res) -> dict:
    from hotweightsd.backends.cuda import CudaBackend

    out: dict = {}
    for label, where in ckpt_dirs.items():
        for mode, threads, chunk in (
            ("pread", 16, 16),
            ("pread", 12, 4),
            ("mmap", 16, 16),
            ("mmap", 8, 64),
            ("mmap", 16, 64),
        ):
            b = CudaBackend(gds="off", reserve=512 * MiB, read_mode=mode, threads=threads, chunk_size=chunk * MiB)
            try:
                b.prepare([0])
                bl.hw_load(b, where, 0, 0)  # warm (page cache, GPU mappings)
                g = [bl.hw_load(b, where, 0, 0)["gbps"] for _ in range(2)]
                out[f"{label} {mode} {threads}x{chunk}MiB"] = bl.summary(g)
                res.note(f"load {label} {mode} {threads}x{chunk}MiB: {g}")
            except Exception as exc:
                res.error(f"load {label} {mode}", exc)
            finally:
                b.close()
        res.save()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None)
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/hw-probe")
    ap.add_argument("--rank-gb", type=float, default=8.5)
    args = ap.parse_args()
    res = bl.Results(args.out or [str(bl.ROOT / "benchmarks" / "results")])
    doc = res.doc
    from hotweights.cuda import devices as cd

    if cd.device_count() == 0:
        doc["fatal"] = f"no GPU: {cd.unavailable_reason()}"
        res.save()
        return 2
    res.set_name(cd.device_name(0))
    res.name = res.name.replace("bench-", "probe-", 1)
    doc["machine"] = {
        "gpus": [cd.device_name(d) for d in range(cd.device_count())],
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
        "shmem_thp": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
    }
    size = int(args.gb * bl.GB) // HUGE * HUGE
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    huge = Path("/tmp/hw-huge-tmpfs")
    huge.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"huge=always,size={int(args.gb + args.rank_gb + 4)}G", "hw-huge", str(huge)],
        capture_output=True,
        text=True,
    )
    doc["huge_tmpfs"] = "mounted" if mounted.returncode == 0 else f"not mounted: {mounted.stderr.strip()}"
    shm = Path("/dev/shm/hw-probe")
    shm.mkdir(exist_ok=True)
    regions = {}
    try:
        files = {"page-cache": work / "region.bin", "dev-shm": shm / "region.bin"}
        if mounted.returncode == 0:
            files["tmpfs-huge"] = huge / "region.bin"
        for p in files.values():
            write_file(p, size)
            with open(p, "rb") as f:  # into the page cache
                while f.read(64 * MiB):
                    pass
        for kind in ("anon-4k", "anon-thp", *files):
            try:
                regions[kind] = probe_region(kind, size, files.get(kind), args.threads)
                res.note(f"{kind}: {regions[kind]}")
            except Exception as exc:
                res.error(kind, exc)
            res.save()
        doc["regions"] = regions
        for p in files.values():
            p.unlink()

        ckpt = work / "ckpt"
        doc["checkpoint"] = bl.make_checkpoint(ckpt, 1, args.rank_gb * bl.GB, 4, 8, res)
        dirs = {"page-cache": ckpt}
        for label, root in (("dev-shm", shm), ("tmpfs-huge", huge)):
            if label == "tmpfs-huge" and mounted.returncode != 0:
                continue
            for f in bl.rank_files(ckpt, 0):
                shutil.copyfile(f, root / Path(f).name)
            dirs[label] = root
        doc["meminfo_after_copies_kb"] = meminfo("ShmemHugePages", "Shmem", "FileHugePages")
        doc["loads"] = loads(dirs, res)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if mounted.returncode == 0:
            subprocess.run(["umount", str(huge)])
        shutil.rmtree(work, ignore_errors=True)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res.save()
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


if __name__ == "__main__":
    sys.exit(main())
