"""pool_cold: the pooled view of the cold runs, and --since picking the runs of one version of the loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pool_cold.py"


def cold_run(folder: Path, stamp: str, auto: float, ceiling: float, peer: float) -> None:
    doc = {
        "args": {"rank_gb": 3.0},
        "targets": {"cold": {"auto": auto, "ceiling": ceiling, "best_peer": "runai", "best_peer_median": peer}},
        "raw": {"shapes": {"odirect 512KiB x16": {"median": ceiling}, "odirect 4MiB x16": {"median": ceiling / 2}}},
    }
    (folder / f"cold-nvidia-h200-{stamp}.json").write_text(json.dumps(doc))


def run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder), *args], capture_output=True, text=True)


def pool(folder: Path, *args: str) -> dict:
    out = run(folder, "--gpu", "nvidia-h200", "--out", str(folder), *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_since_pools_only_the_runs_stamped_at_or_after_it(tmp_path):
    cold_run(tmp_path, "20261204-190739", auto=1.0, ceiling=2.0, peer=1.0)  # an earlier loader: misses the ceiling
    cold_run(tmp_path, "20261204-202126", auto=2.0, ceiling=2.0, peer=1.6)
    cold_run(tmp_path, "20261205-071920", auto=1.9, ceiling=2.0, peer=1.8)

    every = pool(tmp_path)["pooled"]
    assert every["auto_over_ceiling"]["runs"] == 3 and every["auto_over_ceiling"]["min"] == 0.5
    assert every["runs_meeting_both"] == 1  # 1.9 over 1.8 is 1.056x the peer: short of 1.1x

    later = pool(tmp_path, "--since", "20261204-202126")["pooled"]
    assert later["auto_over_ceiling"] == {"runs": 2, "median": 0.975, "min": 0.95, "max": 1.0}
    assert later["runs_judged_on_both"] == 2 and later["runs_meeting_both"] == 1

    written = [json.loads(p.read_text()) for p in tmp_path.glob("cold-pooled-*.json")]
    assert {w["since"] for w in written} == {None, "20261204-202126"}
    assert sorted(len(w["runs"]) for w in written) == [2, 3]


def test_a_since_not_written_as_the_names_stamps_is_refused_naming_it(tmp_path):
    cold_run(tmp_path, "20261204-202126", auto=2.0, ceiling=2.0, peer=1.6)
    out = run(tmp_path, "--since", "2026-12-04")
    assert out.returncode == 2 and "'2026-12-04'" in out.stderr and "YYYYMMDD" in out.stderr
    # a date alone is a stamp too: it keeps the runs of that day and after
    assert pool(tmp_path, "--since", "20261204")["pooled"]["auto_over_ceiling"]["runs"] == 1
    later = run(tmp_path, "--since", "20261205")
    assert later.returncode == 1 and "no cold runs" in later.stderr
