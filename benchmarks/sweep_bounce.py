#!/usr/bin/env python3
"""Settings sweep of the bounce path on a GPU machine: which ring settings come closest to the ceiling.

``bench_load.py`` measures hotweights at one setting against the ceilings and the peers; this script
measures many settings of the pread ring in one run, from page cache and from tmpfs on one GPU, and
with two GPUs loading at once, so defaults are picked from data taken in one machine session:

- the read ceiling: the rank's files read into pinned memory with no GPU copy, at a few thread counts
  and buffer sizes (the best is the ceiling), and the pinned H2D rate;
- a grid: threads x chunk size x ring depth, one load each;
- finalists: the best few, ``--reps`` loads each, taken round-robin with the ceiling read so slow
  drift of the machine hits every setting alike;
- two GPUs (when two are visible): threads per GPU with both ranks loading at once, against both
  ranks read at once.

Writes ``sweep-<gpu>-<date>.json`` into each ``--out`` folder after every section. Rates are GB/s
(1e9 bytes); a load's rate includes planning and allocation, as in ``bench_load.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl

MiB = bl.MiB


def read_file(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def key(s: dict) -> str:
    return f"{s['threads']}x{s['depth']}x{s['chunk_mb']:g}MiB"


def backend_for(s: dict, devices: list[int]):
    """A backend with the sweep entry's settings (fixed reader counts unless ``share``), rings made for ``devices``.
    An entry without ``threads`` is the daemon's default settings, read mode included."""
    if "threads" not in s:
        return bl.cuda_backend(devices=devices, read_mode=s.get("read_mode"))
    return bl.cuda_backend(
        devices=devices,
        read_mode=s.get("read_mode", "pread"),
        threads=s["threads"],
        chunk_size=int(s["chunk_mb"] * MiB),
        ring_depth=s["depth"],
        busy_chunk_size=int(s.get("busy_mb", s["chunk_mb"]) * MiB),
        engine=s.get("engine"),
        share_cores=s.get("share", False),
    )


def load_once(s: dict, ckpt: Path) -> float:
    b = backend_for(s, [0])
    try:
        return bl.hw_load(b, ckpt, 0, 0)["gbps"]
    finally:
        b.close()


READ_CONFIGS = [(16, 16), (16, 4), (16, 2), (12, 2), (12, 1), (8, 16)]  # (threads, MiB a read)


def read_label(threads: int, chunk_mb: int) -> str:
    return f"{threads}x{chunk_mb}MiB"


def read_ceiling(files: list[str], configs: list[tuple[int, int]], reps: int, res) -> dict:
    out = {}
    for threads, chunk_mb in configs:
        b = backend_for({"threads": threads, "chunk_mb": chunk_mb, "depth": 1}, [0])
        try:
            ring = b.ring(0)
            samples = [bl.rate(n, dt) for n, dt, _ in (bl.raw_read(files, ring, direct=False) for _ in range(reps))]
        finally:
            b.close()
        out[read_label(threads, chunk_mb)] = bl.summary(samples)
        res.note(f"  read -> pinned {threads} threads x {chunk_mb}MiB: {out[read_label(threads, chunk_mb)]['median']}")
    return out


def one_source(label: str, ckpt: Path, files: list[str], args, res, budget, h2d_one: float, warm_ring) -> dict:
    doc: dict = {}
    bl.raw_read(files, warm_ring, direct=False)  # page cache: warm the files (a no-op on tmpfs)
    doc["read_ceiling"] = read_ceiling(files, READ_CONFIGS, 2, res)
    best_read = max(v["median"] for v in doc["read_ceiling"].values())
    doc["ceiling"] = min(best_read, h2d_one)
    res.note(f"{label}: read ceiling {best_read}, H2D {h2d_one}, ceiling {doc['ceiling']}")
    res.save()

    grid = {}
    for threads, chunk_mb, depth in itertools.product(args.threads, args.chunks, args.depths):
        if budget() < args.reserve_s:
            res.skip(f"{label} grid rest", "time budget")
            break
        s = {"threads": threads, "chunk_mb": chunk_mb, "depth": depth}
        try:
            grid[key(s)] = (s, load_once(s, ckpt))
        except Exception as exc:
            res.error(f"{label} {key(s)}", exc)
    doc["grid"] = {k: v for k, (_, v) in grid.items()}
    res.note(
        f"{label} grid: " + ", ".join(f"{k} {v}" for k, (_, v) in sorted(grid.items(), key=lambda kv: -kv[1][1])[:8])
    )
    res.save()

    pool = sorted(grid.values(), key=lambda sv: -sv[1])
    finalists = [s for s, _ in pool[: args.finalists]]
    default = current_default()
    if key(default) not in {key(s) for s in finalists}:
        finalists.append(default)  # the current default, for comparison
    backends = {}
    final = {key(s): [] for s in finalists}
    reads = []
    rt, rc = max(READ_CONFIGS, key=lambda tc: doc["read_ceiling"][read_label(*tc)]["median"])
    try:
        for s in finalists:
            backends[key(s)] = backend_for(s, [0])
        read_b = backend_for({"threads": rt, "chunk_mb": rc, "depth": 1}, [0])
        backends["_read"] = read_b
        for _rep in range(args.reps):
            if budget() < args.reserve_s / 2:
                break
            n, dt, _ = bl.raw_read(files, read_b.ring(0), direct=False)
            reads.append(bl.rate(n, dt))
            for s in finalists:
                final[key(s)].append(bl.hw_load(backends[key(s)], ckpt, 0, 0)["gbps"])
    finally:
        for b in backends.values():
            b.close()
    doc["finalists"] = {k: bl.summary(v) for k, v in final.items() if v}
    doc["finalists_read_ceiling"] = bl.summary(reads) if reads else None
    ceiling = min(max(best_read, statistics.median(reads) if reads else 0), h2d_one)
    doc["ceiling"] = ceiling
    for _k, v in doc["finalists"].items():
        v["ratio_to_ceiling"] = round(v["median"] / ceiling, 3)
    best = max(doc["finalists"].items(), key=lambda kv: kv[1]["median"])
    doc["best"] = {"settings": best[0], **best[1]}
    by_key = {key(s): s for s in finalists}
    doc["ranked_settings"] = [by_key[k] for k in sorted(doc["finalists"], key=lambda k: -doc["finalists"][k]["median"])]
    res.note(
        f"{label} finalists: "
        + ", ".join(f"{k} {v['median']} ({v['ratio_to_ceiling']})" for k, v in doc["finalists"].items())
    )
    return doc


def two_gpus(ckpt: Path, args, res, budget, h2d_all: float, winners: list[dict]) -> dict:
    files = {d: bl.rank_files(ckpt, d) for d in range(2)}
    doc: dict = {"read_both": {}, "loads_both": {}}

    def both(fn) -> float:
        out, dt = bl.on_each(range(2), fn)
        return bl.rate(sum(out.values()), dt)

    for threads, chunk_mb in ((8, 16), (16, 16), (8, 2), (16, 2)):
        b = backend_for({"threads": threads, "chunk_mb": chunk_mb, "depth": 1}, [0, 1])
        try:
            both(lambda d: bl.raw_read(files[d], b.ring(d), direct=False)[0])  # warm
            doc["read_both"][f"{threads}x{chunk_mb}MiB per GPU"] = bl.summary(
                [both(lambda d: bl.raw_read(files[d], b.ring(d), direct=False)[0]) for _ in range(2)]
            )
        finally:
            b.close()
    best_read = max(v["median"] for v in doc["read_both"].values())
    doc["ceiling"] = min(best_read, h2d_all)
    res.note(f"two GPUs: read both {doc['read_both']}, ceiling {doc['ceiling']}")
    configs = [dict(w, threads=threads) for w in winners for threads in args.two_gpu_threads]
    seen = set()
    for s in configs:
        if key(s) in seen or budget() < 20:
            continue
        seen.add(key(s))
        b = backend_for(s, [0, 1])
        try:
            samples = [both(lambda d: bl.hw_load(b, ckpt, d, d)["bytes"]) for _ in range(args.reps)]
        except Exception as exc:
            res.error(f"two GPUs {key(s)}", exc)
            continue
        finally:
            b.close()
        doc["loads_both"][key(s) + " per GPU"] = bl.summary(samples)
        res.note(f"two GPUs {key(s)} per GPU: {doc['loads_both'][key(s) + ' per GPU']['median']}")
        res.save()
    if doc["loads_both"]:
        best = max(doc["loads_both"].items(), key=lambda kv: kv[1]["median"])
        doc["best"] = {"settings": best[0], **best[1], "ratio_to_ceiling": round(best[1]["median"] / doc["ceiling"], 3)}
    return doc


def current_default() -> dict:
    """The loader's own default settings on this machine, as a sweep entry."""
    from hotweightsd.loaders.path import choose
    from hotweightsd.loaders.settings import LoaderSettings

    d = choose(LoaderSettings(gds="off"), cores=len(os.sched_getaffinity(0)), real_driver=False)
    return {"threads": d.threads, "chunk_mb": d.chunk_size / MiB, "depth": d.depth, "busy_mb": d.busy_chunk / MiB}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None)
    ap.add_argument("--workdir", default="/tmp/hw-sweep")
    ap.add_argument("--rank-gb", type=float, default=8.5)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[8, 12, 16])
    ap.add_argument(
        "--chunks",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[1, 2, 4, 8, 16],
        help="chunk sizes, MiB (0.25 and 0.5 are fine: any multiple of 4 KiB)",
    )
    ap.add_argument("--depths", type=lambda v: [int(x) for x in v.split(",")], default=[2, 4])
    ap.add_argument("--two-gpu-threads", type=lambda v: [int(x) for x in v.split(",")], default=[4, 6, 8, 12, 16])
    ap.add_argument("--finalists", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: tmpfs, two-gpu")
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--reserve-s", type=float, default=60.0, help="seconds kept for the later sections")
    ap.add_argument("--pretouch-gb", type=float, default=24.0)
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    res = bl.Results(args.out or [str(bl.ROOT / "benchmarks" / "results")])
    deadline = time.monotonic() + args.budget
    budget = lambda: deadline - time.monotonic()
    doc = res.doc
    doc["args"] = vars(args)

    from hotweights.cuda import devices as cd

    ngpu = cd.device_count()
    if ngpu == 0:
        doc["fatal"] = f"no GPU: {cd.unavailable_reason()}"
        res.note(doc["fatal"])
        res.save()
        return 2
    names = [cd.device_name(d) for d in range(ngpu)]
    res.set_name(names[0])
    res.name = res.name.replace("bench-", "sweep-", 1)
    gpus = min(ngpu, 2)
    doc["machine"] = {
        "gpus": names,
        "cpus": os.cpu_count(),
        "numa_nodes": cd.numa_nodes(),
        "thp_enabled": read_file("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": read_file("/sys/kernel/mm/transparent_hugepage/defrag"),
        "kernel": os.uname().release,
    }
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    touch = threading.Thread(
        target=lambda: doc.setdefault("pretouch_s", round(bl.pretouch(int(args.pretouch_gb * bl.GB)), 1))
    )
    touch.start()
    doc["checkpoint"] = bl.make_checkpoint(ckpt, gpus, args.rank_gb * bl.GB, args.files, 8, res)
    touch.join()
    files0 = bl.rank_files(ckpt, 0)

    h = {"one_gpu": bl.h2d([0], 1024 * MiB)}
    if gpus > 1:
        h["all_gpus"] = bl.h2d(list(range(gpus)), 1024 * MiB)
    doc["h2d"] = h
    res.note(f"H2D: {h}")
    warm = backend_for({"threads": 16, "chunk_mb": 16, "depth": 1}, [0])
    bl.raw_read(files0, warm.ring(0), direct=False)
    res.save()

    winners: list[dict] = []
    try:
        doc["page_cache"] = one_source(
            "page cache", ckpt, files0, args, res, budget, h["one_gpu"]["aggregate"], warm.ring(0)
        )
        res.save()
        best = doc["page_cache"]["best"]["settings"]
        winners = doc["page_cache"]["ranked_settings"][:2]
        res.note(f"page cache best: {best}")
        if "tmpfs" not in skip and budget() > args.reserve_s:
            shm = Path("/dev/shm/hw-sweep")
            shutil.rmtree(shm, ignore_errors=True)
            shm.mkdir(parents=True)
            try:
                for f in files0:
                    shutil.copyfile(f, shm / Path(f).name)
                doc["tmpfs"] = one_source(
                    "tmpfs", shm, bl.rank_files(shm, 0), args, res, budget, h["one_gpu"]["aggregate"], warm.ring(0)
                )
            finally:
                shutil.rmtree(shm, ignore_errors=True)
            res.save()
    except Exception as exc:
        res.error("one GPU", exc)
    finally:
        warm.close()
    if gpus > 1 and "two-gpu" not in skip:
        try:
            doc["two_gpu"] = two_gpus(
                ckpt,
                args,
                res,
                budget,
                h["all_gpus"]["aggregate"],
                winners or [{"threads": 16, "chunk_mb": 16, "depth": 2}],
            )
        except Exception as exc:
            res.error("two GPUs", exc)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res.save()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
