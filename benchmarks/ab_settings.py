#!/usr/bin/env python3
"""A/B of a few bounce-ring settings from page cache, taken round-robin in one process.

``sweep_bounce.py`` ranks many settings with one load each; this script takes a handful, ``--reps``
loads each, interleaved with a raw read of the same files, so a machine that drifts or stalls during
the run hits every setting alike. Used to check the defaults on a machine whose figures looked off.

Writes ``ab-slot-<gpu>-<date>.json`` into each ``--out`` (default $OUT, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load as bl  # noqa: E402
import sweep_bounce as sb  # noqa: E402

SETTINGS = {
    "16x2x4MiB": dict(threads=16, chunk_mb=4, depth=2),
    "16x2x4MiB block": dict(threads=16, chunk_mb=4, depth=2, sync="block"),
    "12x2x4MiB": dict(threads=12, chunk_mb=4, depth=2),
    "8x2x4MiB": dict(threads=8, chunk_mb=4, depth=2),
    "16x2x8MiB": dict(threads=16, chunk_mb=8, depth=2),
    "16x2x8MiB block": dict(threads=16, chunk_mb=8, depth=2, sync="block"),
    "16x2x16MiB": dict(threads=16, chunk_mb=16, depth=2),
    "16x2x16MiB block": dict(threads=16, chunk_mb=16, depth=2, sync="block"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None)
    ap.add_argument("--workdir", default="/tmp/hw-ab")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    outs = args.out or [os.environ.get("OUT") or str(bl.ROOT / "benchmarks" / "results")]
    from hotweightsd.backends import cuda_driver as cd

    res = bl.Results(outs)
    res.set_name(cd.device_name(0))
    res.name = res.name.replace("bench-", "ab-slot-", 1)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    res.doc["checkpoint"] = bl.make_checkpoint(ckpt, 1, 8.5e9, 4, 8, res)
    files = bl.rank_files(ckpt, 0)
    backends = {k: sb.backend_for(v, [0]) for k, v in SETTINGS.items()}
    try:
        read_ring = backends["16x2x4MiB"].ring(0)
        bl.raw_read(files, read_ring, direct=False)
        loads: dict[str, list[float]] = {k: [] for k in SETTINGS}
        reads = []
        for _ in range(args.reps):
            n, dt, _ = bl.raw_read(files, read_ring, direct=False)
            reads.append(bl.rate(n, dt))
            for k, b in backends.items():
                loads[k].append(bl.hw_load(b, ckpt, 0, 0)["gbps"])
    finally:
        for b in backends.values():
            b.close()
        shutil.rmtree(work, ignore_errors=True)
    res.doc["read_4MiB"] = reads
    res.doc["loads"] = loads
    res.note(json.dumps({"read": reads, **loads}))
    res.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
