#!/usr/bin/env python3
"""Does pinning page-cache pages in place stall the copy workers only when both share a process?

In one process, a thread that registers page-cache windows (``cuMemHostRegister``) beside the bounce
ring's copy workers made both slower (benchmarks/results/NOTES.md). This probe separates the two:

- A: the bounce ring (pread mode) loading a rank from page cache, alone;
- B: a pinner, registering 256 MiB windows of another page-cache file, copying them to the GPU and
  unregistering them, alone;
- A and B at once, B as a thread of A's process, then B as a separate process.

Writes ``probe2-<gpu>-<date>.json`` into each ``--out``. Rates are GB/s (1e9 bytes).
"""

from __future__ import annotations

import argparse
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


def pinner(path: str, window: int, seconds: float, ready=None, go=None) -> dict:
    """Registers, copies and unregisters windows of ``path`` round and round for ``seconds``."""
    import ctypes
    import mmap

    from hotweights.cuda import devices as cd

    cd.set_current(0)
    drv = cd.init()
    size = os.path.getsize(path) // window * window
    fd = os.open(path, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    base = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    dev = int(cd.check(drv.cuMemAlloc(window * 2), "cuMemAlloc"))
    stream = cd.check(drv.cuStreamCreate(1), "cuStreamCreate")
    events = [cd.check(drv.cuEventCreate(2), "cuEventCreate") for _ in range(2)]
    flags = int(drv.CU_MEMHOSTREGISTER_READ_ONLY)
    inflight: list[int] = []
    if ready is not None:
        ready()
    if go is not None:
        go()
    t0 = time.perf_counter()
    moved = k = 0
    while time.perf_counter() - t0 < seconds:
        off = (k * window) % size
        s = k % 2
        if len(inflight) == 2:
            cd.check(drv.cuEventSynchronize(events[s]), "cuEventSynchronize")
            cd.check(drv.cuMemHostUnregister(inflight.pop(0)), "cuMemHostUnregister")
        cd.check(drv.cuMemHostRegister(base + off, window, flags), "cuMemHostRegister")
        inflight.append(base + off)
        cd.check(drv.cuMemcpyHtoDAsync(dev + s * window, base + off, window, stream), "cuMemcpyHtoDAsync")
        cd.check(drv.cuEventRecord(events[s], stream), "cuEventRecord")
        moved += window
        k += 1
    cd.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
    dt = time.perf_counter() - t0
    for a in inflight:
        drv.cuMemHostUnregister(a)
    drv.cuMemFree(dev)
    os.close(fd)
    return {"bytes": moved, "seconds": round(dt, 3), "gbps": bl.rate(moved, dt), "windows": k}


def loads(backend, ckpt: Path, n: int) -> dict:
    t0 = time.perf_counter()
    g = [bl.hw_load(backend, ckpt, 0, 0) for _ in range(n)]
    dt = time.perf_counter() - t0
    return {"gbps": [r["gbps"] for r in g], "bytes": sum(r["bytes"] for r in g), "seconds": round(dt, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None)
    ap.add_argument("--workdir", default="/tmp/hw-probe2")
    ap.add_argument("--rank-gb", type=float, default=8.5)
    ap.add_argument("--pin-gb", type=float, default=8.0)
    ap.add_argument("--window-mb", type=int, default=256)
    ap.add_argument("--loads", type=int, default=4)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    window = args.window_mb * MiB
    if args.child:  # B as its own process: "ready" on stdout, waits for a line on stdin, prints its result
        out = pinner(
            args.child, window, args.seconds, ready=lambda: print("ready", flush=True), go=lambda: sys.stdin.readline()
        )
        print(repr(out), flush=True)
        return 0

    from hotweights.cuda import devices as cd

    res = bl.Results(args.out or [str(bl.ROOT / "benchmarks" / "results")])
    res.set_name(cd.device_name(0))
    res.name = res.name.replace("bench-", "probe2-", 1)
    doc = res.doc
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    doc["checkpoint"] = bl.make_checkpoint(ckpt, 1, args.rank_gb * bl.GB, 4, 8, res)
    pin_file = work / "pin.bin"
    block = os.urandom(64 * MiB)
    with open(pin_file, "wb") as f:
        for _ in range(int(args.pin_gb * bl.GB) // len(block)):
            f.write(block)
    for p in [pin_file, *bl.rank_files(ckpt, 0)]:
        with open(p, "rb") as f:
            while f.read(64 * MiB):
                pass
    b = bl.cuda_backend(devices=[0], read_mode="pread", threads=16, chunk_size=4 * MiB)
    try:
        bl.hw_load(b, ckpt, 0, 0)
        doc["a_alone"] = loads(b, ckpt, args.loads)
        res.note(f"A alone: {doc['a_alone']}")
        secs = doc["a_alone"]["seconds"]
        doc["b_alone"] = pinner(str(pin_file), window, secs)
        res.note(f"B alone: {doc['b_alone']}")
        res.save()

        # B as a thread of this process
        box: dict = {}
        started = threading.Event()
        t = threading.Thread(target=lambda: box.update(pinner(str(pin_file), window, secs, go=started.wait)))
        t.start()
        started.set()
        doc["a_with_b_thread"] = loads(b, ckpt, args.loads)
        t.join()
        doc["b_thread"] = box
        res.note(f"A with B as a thread: {doc['a_with_b_thread']}; B {box}")
        res.save()

        # B as its own process
        env = dict(os.environ)
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                str(pin_file),
                "--window-mb",
                str(args.window_mb),
                "--seconds",
                str(secs),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        doc["a_with_b_process"] = loads(b, ckpt, args.loads)
        out, _ = child.communicate(timeout=120)
        doc["b_process"] = out.strip()
        res.note(f"A with B as a process: {doc['a_with_b_process']}; B {out.strip()}")
    finally:
        b.close()
        shutil.rmtree(work, ignore_errors=True)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
