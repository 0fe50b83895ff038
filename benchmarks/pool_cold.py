#!/usr/bin/env python3
"""A pooled view of the cold runs: every ``cold-<gpu>-<date>.json`` in a folder, pooled.

Each cold run compares, in one interleaved rotation, the daemon's default load with the best raw
read shape (the ceiling) and with the peers. Single runs swing by more than the margins being
judged, so this reads them all and reports, per run and pooled (medians, min, max):

- ``auto_over_ceiling``: the default load over the best raw shape's median;
- ``auto_over_best_peer``: the default load over the best peer's median;
- ``best_peer_over_ceiling``: how close the best peer came to the ceiling. Where it is above 1/1.1
  (0.909), a 1.1x lead over it would need a load faster than the fastest raw read of the run.

and, per raw read shape, the default load over that one shape's median across the runs that measured
it, with the number of runs it was the fastest and the slowest of the shapes its run measured
(``auto_over_shape``). The ceiling is the best of several noisy medians, so it sits above any one shape's
typical rate; this table shows which fixed shape the load trails and by how much. In runs without
``--ceiling-in-rotation`` the shapes ran in a section of their own before the loads, so there the
comparison is of two stretches of the disk's life, not of one rotation.

    python benchmarks/pool_cold.py benchmarks/results --gpu nvidia-h200 --out benchmarks/results

Writes ``cold-pooled-<gpu>-<date>.json`` (``cold-pooled-<gpu>-since-<stamp>-<date>.json`` with ``--since``)
into each ``--out`` folder (none: prints only).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

RATIOS = ("auto_over_ceiling", "auto_over_best_peer", "best_peer_over_ceiling")


def stamp(name: str) -> str:
    """The date of a result's name: ``cold-nvidia-h200-20261204-202126.json`` -> ``20261204-202126``."""
    parts = name.removesuffix(".json").split("-")
    return "-".join(parts[-2:])


def run_row(path: Path) -> dict | None:
    doc = json.loads(path.read_text())
    t = (doc.get("targets") or {}).get("cold") or {}
    if not t.get("auto"):
        return None
    row = {
        "file": path.name,
        "rank_gb": (doc.get("args") or {}).get("rank_gb"),
        "auto": t["auto"],
        "ceiling": t.get("ceiling"),
        "best_peer": t.get("best_peer"),
        "best_peer_median": t.get("best_peer_median"),
    }
    row["auto_over_ceiling"] = round(t["auto"] / t["ceiling"], 3) if t.get("ceiling") else None
    row["auto_over_best_peer"] = round(t["auto"] / t["best_peer_median"], 3) if t.get("best_peer_median") else None
    both = t.get("ceiling") and t.get("best_peer_median")
    row["best_peer_over_ceiling"] = round(t["best_peer_median"] / t["ceiling"], 3) if both else None
    shapes = {k: v["median"] for k, v in ((doc.get("raw") or {}).get("shapes") or {}).items() if v.get("median")}
    row["auto_over_shape"] = {k: round(t["auto"] / m, 3) for k, m in shapes.items()}
    row["fastest_shape"] = max(shapes, key=shapes.__getitem__) if shapes else None
    row["slowest_shape"] = min(shapes, key=shapes.__getitem__) if shapes else None
    return row


def by_shape(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for name in sorted({k for r in rows for k in r["auto_over_shape"]}):
        xs = [r["auto_over_shape"][name] for r in rows if name in r["auto_over_shape"]]
        out[name] = {
            "runs": len(xs),
            "median": round(statistics.median(xs), 3),
            "min": min(xs),
            "max": max(xs),
            "fastest_in": sum(1 for r in rows if r["fastest_shape"] == name),
            "slowest_in": sum(1 for r in rows if r["slowest_shape"] == name),
        }
    return out


def pooled(rows: list[dict]) -> dict:
    out = {}
    for key in RATIOS:
        xs = [r[key] for r in rows if r[key] is not None]
        if xs:
            out[key] = {"runs": len(xs), "median": round(statistics.median(xs), 3), "min": min(xs), "max": max(xs)}
    xs = [r for r in rows if r["auto_over_ceiling"] is not None and r["auto_over_best_peer"] is not None]
    out["runs_meeting_both"] = sum(1 for r in xs if r["auto_over_ceiling"] >= 0.95 and r["auto_over_best_peer"] >= 1.1)
    out["runs_judged_on_both"] = len(xs)
    out["runs_where_1_1x_needs_more_than_the_ceiling"] = sum(
        1 for r in rows if r["best_peer_over_ceiling"] is not None and r["best_peer_over_ceiling"] * 1.1 > 1.0
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gpu", default="", help="only files for this device (the name in cold-<gpu>-<date>.json)")
    ap.add_argument("--out", action="append", default=[], help="results folder (repeatable)")
    ap.add_argument(
        "--since",
        default="",
        help="only runs stamped at or after this date (the YYYYMMDD-HHMMSS of their names): the runs of one "
        "version of the loader",
    )
    args = ap.parse_args()
    # a stamp compares as text, so a date written with dashes would silently keep every run
    if args.since and not re.fullmatch(r"\d{8}(-\d{6})?", args.since):
        ap.error(f"--since {args.since!r}: expected YYYYMMDD or YYYYMMDD-HHMMSS, as in the results' names")
    paths = sorted(
        p for p in args.folder.glob(f"cold-{args.gpu}*.json") if "pooled" not in p.name and stamp(p.name) >= args.since
    )
    rows = [r for r in (run_row(p) for p in paths) if r is not None]
    if not rows:
        print(f"no cold runs with a default-load median under {args.folder}", file=sys.stderr)
        return 1
    doc = {
        "benchmark": "cold runs pooled",
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpu": args.gpu,
        "since": args.since or None,
    }
    doc.update(pooled=pooled(rows), auto_over_shape=by_shape(rows), runs=rows)
    print(json.dumps({k: doc[k] for k in ("pooled", "auto_over_shape")}, indent=1))
    for out in args.out:
        Path(out).mkdir(parents=True, exist_ok=True)
        since = f"-since-{args.since}" if args.since else ""
        name = f"cold-pooled-{args.gpu or 'all'}{since}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        (Path(out) / name).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
