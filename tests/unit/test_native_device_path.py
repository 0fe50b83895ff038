"""The native engine's device path (streams, events, the copies a slot must outlive) without a GPU.

A stand-in driver (tests/support/fake_libcuda.c, built here) runs each stream's copies later, in order,
on a thread of its own, as a GPU runs queued copies: an engine that read into a slot before that slot's
copies had run, or returned with copies in flight, leaves wrong bytes or queued copies behind. The
engine runs in a child process (tests/clients/native_device_fill.py), where the stand-in is the driver
it finds. On a GPU, tests/gpu runs the same path against the real driver.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from test_native_loader import c_compiler, needs_lib

from hotweights.testing import CLI_TIMEOUT
from support import CLIENTS, TESTS, child_env
from support.native_fills import COPY, EVENT_RECORD, EVENT_SYNC, STREAM_SYNC, random_layout

KiB = 1024


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory) -> str:
    cc = c_compiler()
    if cc is None:
        pytest.skip("no C compiler to build the stand-in driver")
    out = tmp_path_factory.mktemp("fake-driver") / "libcuda.so.1"
    subprocess.run(
        [*shlex.split(cc), "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out)]
        + [str(TESTS / "support" / "fake_libcuda.c"), "-lpthread"],
        check=True,
        timeout=CLI_TIMEOUT,
    )
    return str(out)


def fill(fake_driver: str, tmp_path, runs: list[dict], seed: int = 7) -> dict[str, dict]:
    paths, segs, size = random_layout(tmp_path, seed)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "paths": paths,
                "segments": [[s.file, s.file_offset, s.length, s.allocation, s.offset] for s in segs],
                "size": size,
                "runs": runs,
            }
        )
    )
    child = subprocess.run(
        [sys.executable, str(CLIENTS / "native_device_fill.py"), fake_driver, str(spec)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert child.returncode == 0, f"the child died ({child.returncode}): {child.stderr[-3000:]}"
    got = {r["name"]: r for r in map(json.loads, child.stdout.splitlines())}
    assert sorted(got) == sorted(r["name"] for r in runs), child.stdout
    return got


RUN = {"chunk": 64 * KiB, "threads": 4, "depth": 2, "direct": False, "grid": 0}


@needs_lib
def test_every_byte_lands_though_the_copies_run_late(fake_driver, tmp_path):
    """Copies that run after their read's next reads have started: the engine waits on each slot's event
    before reading into it again, and returns with nothing in flight."""
    runs = [
        {**RUN, "name": "one slot each", "depth": 1},
        {**RUN, "name": "two slots each"},
        {**RUN, "name": "three slots, eight readers", "threads": 8, "depth": 3},
        {**RUN, "name": "aligned supersets", "direct": True},
        {**RUN, "name": "re-cut on a 16 KiB grid", "direct": True, "grid": 16 * KiB},
    ]
    for name, r in fill(fake_driver, tmp_path, runs).items():
        assert "error" not in r, (name, r)
        assert r["exact"], (name, r)
        assert r["pending"] == 0, (name, r)
        # every copy went through the driver, and the fill counted what it queued
        assert r["driver_copies"] == r["copies"], (name, r)
        if not r["name"].startswith("re-cut"):
            assert r["copies"] == r["planned_copies"], (name, r)
        reading, waiting, queueing, draining = r["shares"]
        assert reading > 0 and min(waiting, queueing, draining) >= 0, (name, r)
        assert reading + waiting + queueing + draining <= r["span"], (name, r)
        assert "% waiting on copies" in r["described"], (name, r)


@needs_lib
@pytest.mark.parametrize(
    "fail,op,code",
    [
        ((COPY, 9, 2), "cuMemcpyHtoDAsync", 2),
        ((EVENT_SYNC, 3, 700), "cuEventSynchronize", 700),
        ((STREAM_SYNC, 2, 999), "cuStreamSynchronize", 999),
        ((EVENT_RECORD, 4, 400), "cuEventRecord", 400),
    ],
    ids=["copy", "event-sync", "stream-sync", "event-record"],
)
def test_a_driver_error_is_raised_with_its_call_and_code_and_leaves_nothing_in_flight(
    fake_driver, tmp_path, fail, op, code
):
    r = fill(fake_driver, tmp_path, [{**RUN, "name": "failing", "fail": list(fail)}])["failing"]
    assert r.get("error") == "CudaError", r
    assert r["said"].startswith(f"{op} failed: ") and f"({code})" in r["said"], r
    if op == "cuMemcpyHtoDAsync":  # the copy names the file and the byte it was to carry
        assert ".bin at " in r["said"], r
    assert r["pending"] == 0, r


@needs_lib
def test_a_context_the_driver_refuses_stops_the_fill_before_any_read(fake_driver, tmp_path):
    r = fill(fake_driver, tmp_path, [{**RUN, "name": "wrong context", "context": "wrong"}])["wrong context"]
    assert r.get("error") == "CudaError" and r["said"].startswith("cuCtxSetCurrent failed: "), r
    assert "(201)" in r["said"] and r["driver_copies"] == 0 and r["pending"] == 0, r


@needs_lib
def test_a_fill_cancelled_while_its_slots_wait_on_copies_stops_and_leaves_none_in_flight(fake_driver, tmp_path):
    """Cancelled with every copy held (each reader's slots full, its next read waiting on them); the copies
    let go once the engine is told: it stops within a chunk per reader instead of reading the rest."""
    r = fill(fake_driver, tmp_path, [{**RUN, "name": "cancelled", "threads": 2, "cancel": True}])["cancelled"]
    assert r.get("error") == "Aborted" and r["said"] == "load cancelled", r
    assert r["pending"] == 0, r
    # held: two slots of each of the two readers queued, then one more chunk each once let go
    assert 0 < r["driver_copies"] < r["planned_copies"], r
