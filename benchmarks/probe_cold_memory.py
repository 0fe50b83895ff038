#!/usr/bin/env python3
"""Cold O_DIRECT reads by where they land: does the memory a read goes into change the cold rate?

The cold benchmark's raw shapes read into plain anonymous memory (``bench_cold.HostBuffers``); the loader
reads into its pinned ring (``cuMemHostAlloc``). Each round starts one label later
(``bench_cold.interleaved``), so a label's rate does not stand for its place in the round (what an
unrotated run showed: benchmarks/README.md, "Reading older results"). O_DIRECT builds each request from the pages of the
destination, and a block device takes at most ``max_segments`` of them per request, so a destination of
scattered 4 KiB pages can cut a large read into smaller requests than a physically contiguous one. This
probe reads the same cold files O_DIRECT on the native engine (host mode: reads only, no copies) into:

- ``shared``: a shared anonymous mapping, touched (``mmap.mmap(-1, n)``: shmem, never transparent huge
  pages; what bench_cold's raw shapes used before they moved to private memory);
- ``private``: private anonymous memory, touched;
- ``thp``: the same with ``MADV_HUGEPAGE`` before the touch (transparent huge pages where the kernel
  allows them);
- ``pinned``: ``cuMemHostAlloc`` memory, as the loader's ring (needs a GPU);
- ``pinned-thp``: ``thp`` memory registered with ``cuMemHostRegister`` (needs a GPU);

at 4 MiB x 12 readers (the loader's default ring) and 64 MiB x 16 (the raw shape that led the cold runs),
every combination a median of ``--reps`` interleaved repetitions, pages dropped before each (fadvise).
It also records the disk's queue limits and the kernel's huge-page settings. Writes
``probe-cold-memory-<gpu>-<date>.json`` into each ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_cold as bc  # noqa: E402  (needs benchmarks/ on sys.path first)
import bench_load as bl  # noqa: E402

MiB, GB = bl.MiB, bl.GB
SHAPES = {"4MiB x12": (4 * MiB, 12), "64MiB x16": (64 * MiB, 16)}
MEMORIES = bc.BUFFER_KINDS


def queue_limits(path: str) -> dict:
    """The block device under ``path``: its request limits (sysfs), and the kernel's huge-page settings."""
    out: dict = {}
    dev = os.stat(path).st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in (f"{base}/queue", f"{base}/../queue"):
        if os.path.isdir(q):
            for name in ("max_segments", "max_segment_size", "max_sectors_kb", "max_hw_sectors_kb", "nr_requests"):
                try:
                    out[name] = Path(q, name).read_text().strip()
                except OSError:
                    pass
            out["queue"] = os.path.realpath(q)
            break
    for name in ("enabled", "defrag"):
        try:
            out[f"thp_{name}"] = Path("/sys/kernel/mm/transparent_hugepage", name).read_text().strip()
        except OSError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None, help="folder for the JSON (repeatable)")
    ap.add_argument("--workdir", default="/tmp/hw-probe-cold", help="where the files are written (a disk)")
    ap.add_argument("--gb", type=float, default=3.0, help="bytes read per pass, in GB (4 files)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memories", default=",".join(MEMORIES))
    ap.add_argument("--budget", type=float, default=300.0)
    args = ap.parse_args()
    from hotweights.cuda import devices as cd

    res = bl.Results(args.out or [str(HERE / "results")])
    gpu = cd.device_name(0) if cd.device_count() else "cpu"
    res.set_name(gpu)
    res.name = "probe-cold-memory-" + (res.name or "").removeprefix("bench-")
    memories = [m for m in args.memories.split(",") if m and (gpu != "cpu" or not m.startswith("pinned"))]
    deadline = time.monotonic() + args.budget
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    doc = res.doc
    doc["args"] = vars(args)
    mem: dict[str, bc.HostBuffers] = {}
    try:
        touch = threading.Thread(target=lambda: doc.setdefault("pretouch_s", bl.pretouch(int(args.gb * 4 * GB))))
        touch.start()
        doc["checkpoint"] = bl.make_checkpoint(work, 1, args.gb * GB, 4, 8, res)
        touch.join()
        paths = bl.rank_files(work, 0)
        doc["limits"] = queue_limits(paths[0])
        res.note(f"limits: {doc['limits']}")
        for kind in memories:  # made before anything is timed
            mem[kind] = bc.HostBuffers(kind=kind)
            for size, threads in SHAPES.values():
                mem[kind].get(size * threads)
        doc["huge_share"] = {k: m.huge_share() for k, m in mem.items()}
        labels = [f"{m} {s}" for m in memories for s in SHAPES]
        nbytes = sum(os.path.getsize(p) for p in paths)

        def once(label: str) -> float:
            kind, shape = label.split(" ", 1)
            size, threads = SHAPES[shape]
            bc.prepare(paths, "cold")
            n, dt, _ = bc.native_read(paths, size, threads, True, mem[kind])
            return bl.rate(n, dt)

        out = bc.interleaved(labels, args.reps, once, lambda: deadline - time.monotonic(), nbytes / GB / 1.2 + 1)
        doc["reads"] = out
        res.note("; ".join(f"{k} {v['median']} [{v['min']}-{v['max']}]" for k, v in out.items()))
        res.save()
    finally:
        for m in mem.values():
            m.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
