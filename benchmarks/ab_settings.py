#!/usr/bin/env python3
"""A/B of a few loader settings, taken round-robin in one process.

``sweep_bounce.py`` ranks many settings with one load each; this script takes a handful (``--only``),
``--reps`` loads each, interleaved with a raw read of the same files, so a machine that drifts or stalls
during the run hits every setting alike. From page cache, and with ``--tmpfs`` from /dev/shm too; with
two GPUs visible, also both ranks at once (``--skip-two-gpu`` leaves that out).

Writes ``ab-<gpu>-<date>.json`` into each ``--out`` (default $OUT, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl
import sweep_bounce as sb

SETTINGS = {  # a fixed reader count per GPU; "shared" splits the cores among GPUs loading at once (the default)
    "shared": dict(threads=16, chunk_mb=4, depth=2, share=True),
    "16x2x4MiB": dict(threads=16, chunk_mb=4, depth=2),
    "14x2x4MiB": dict(threads=14, chunk_mb=4, depth=2),
    "10x2x4MiB": dict(threads=10, chunk_mb=4, depth=2),
    "12x2x4MiB": dict(threads=12, chunk_mb=4, depth=2),
    "8x2x4MiB": dict(threads=8, chunk_mb=4, depth=2),
    "6x2x4MiB": dict(threads=6, chunk_mb=4, depth=2),
    "16x2x8MiB": dict(threads=16, chunk_mb=8, depth=2),
    "16x2x16MiB": dict(threads=16, chunk_mb=16, depth=2),
    "python-16x2x4MiB": dict(threads=16, chunk_mb=4, depth=2, engine="python", busy_mb=16),
    "12x2x8MiB": dict(threads=12, chunk_mb=8, depth=2),
    "12x3x4MiB": dict(threads=12, chunk_mb=4, depth=3),
    "12x4x2MiB": dict(threads=12, chunk_mb=2, depth=4),
    "default": dict(),  # the daemon's defaults (read mode auto)
    "default-pread": dict(read_mode="pread"),
    "auto-12x2x4MiB": dict(threads=12, chunk_mb=4, depth=2, read_mode="auto"),
}


def round_robin(backends: dict, ckpt: Path, files: list[str], read_ring, reps: int, devices: list[int]) -> dict:
    """``reps`` rounds: one raw read (all devices' files at once), then one load per setting."""

    def read_all():
        out, dt = bl.on_each(devices, lambda d: bl.raw_read(files[d], read_ring(d), direct=False)[0])
        return bl.rate(sum(out.values()), dt)

    read_all()  # warm
    loads: dict[str, list[float]] = {k: [] for k in backends}
    reads = []
    for _ in range(reps):
        reads.append(read_all())
        for k, b in backends.items():
            out, dt = bl.load_at_once(b, ckpt, devices)
            loads[k].append(bl.rate(sum(v["bytes"] for v in out.values()), dt))
    return {"raw_read": bl.summary(reads), "loads": {k: bl.summary(v) for k, v in loads.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None)
    ap.add_argument("--workdir", default="/tmp/hw-ab")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--only", default="", help=f"comma list of settings (default all): {', '.join(SETTINGS)}")
    ap.add_argument("--tmpfs", action="store_true", help="also from /dev/shm")
    ap.add_argument("--skip-two-gpu", action="store_true")
    args = ap.parse_args()
    outs = args.out or [os.environ.get("OUT") or str(bl.ROOT / "benchmarks" / "results")]
    chosen = {k: SETTINGS[k] for k in (args.only.split(",") if args.only else SETTINGS)}
    from hotweights.cuda import devices as cd

    res = bl.Results(outs)
    res.set_name(cd.device_name(0))
    res.name = res.name.replace("bench-", "ab-", 1)
    gpus = 2 if cd.device_count() >= 2 and not args.skip_two_gpu else 1
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    res.doc["settings"] = chosen
    res.doc["checkpoint"] = bl.make_checkpoint(ckpt, gpus, 8.5e9, 4, 8, res)
    res.doc["h2d"] = {"one_gpu": bl.h2d([0], 1024 * bl.MiB)}
    if gpus > 1:
        res.doc["h2d"]["all_gpus"] = bl.h2d([0, 1], 1024 * bl.MiB)
    res.note(f"H2D: {res.doc['h2d']}")
    backends = {k: sb.backend_for(v, list(range(gpus))) for k, v in chosen.items()}
    reader = sb.backend_for({"threads": 16, "chunk_mb": 4, "depth": 1}, list(range(gpus)))
    shm = Path("/dev/shm/hw-ab")
    try:
        files = {d: bl.rank_files(ckpt, d) for d in range(gpus)}
        sections = [("page_cache", ckpt, files, [0])]
        if gpus > 1:
            sections.append(("two_gpu", ckpt, files, [0, 1]))
        if args.tmpfs:
            shm.mkdir(parents=True, exist_ok=True)
            for f in files[0]:
                shutil.copyfile(f, shm / Path(f).name)
            sections.append(("tmpfs", shm, {0: bl.rank_files(shm, 0)}, [0]))
        for name, where, fs, devices in sections:
            out = round_robin(backends, where, fs, reader.ring, args.reps, devices)
            out["descriptions"] = {k: bl.hw_load(b, where, 0, 0)["description"] for k, b in backends.items()}
            res.doc[name] = out
            res.note(
                f"{name}: read {out['raw_read']['median']}; "
                + ", ".join(f"{k} {v['median']}" for k, v in out["loads"].items())
            )
            res.save()
    except Exception as exc:
        res.error("ab", exc)
    finally:
        for b in list(backends.values()) + [reader]:
            b.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    res.note(json.dumps({k: res.doc.get(k, {}).get("loads") for k in ("page_cache", "two_gpu", "tmpfs")}))
    res.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
