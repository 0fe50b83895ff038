"""The native engine's device path against a stand-in driver (tests/support/fake_libcuda.c), in a
process of its own: the engine finds its driver once per process, and the stand-in must be that driver.

    native_device_fill.py FAKE_LIBCUDA SPEC_JSON

SPEC_JSON: {"paths": [...], "segments": [[file, file_offset, length, allocation, offset], ...], "size": N,
"runs": [{"name", "chunk", "threads", "depth", "direct", "grid", "fail": [kind, n, code] | null,
"context": "fake" | "wrong", "cancel": bool}, ...]}. Prints one JSON line per run: whether every byte
landed, the counts, the error (its type and text) where the fill raised, and the copies still queued
after it returned.

"cancel": the stand-in holds every copy, the fill's first progress cancels it, and the copies are let go
once the engine has been told (its job's cancel flag): the engine is then stopped in mid-fill, with
its slots waiting on copies, whatever the machine's speed.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

from hotweights.testing import CLI_TIMEOUT, wait_until
from hotweightsd.core.layout import Segment
from hotweightsd.loaders import native
from hotweightsd.loaders.plan import plan_chunks
from support.native_fills import COPY, KINDS, expected

KEPT: list = []  # every run's ring and destination: a copy an engine left in flight must not write freed memory


class _Job(native.Job):
    """The engine's job, kept where this process can see its cancel flag."""

    made: list[native.Job] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Job.made.append(self)


def main() -> None:
    fake_path, spec_path = sys.argv[1:3]
    # Loaded first and globally: the engine's dlopen("libcuda.so.1") then finds it by its soname.
    fake = ctypes.CDLL(fake_path, mode=ctypes.RTLD_GLOBAL)
    for name in ("fake_context", "fake_stream", "fake_event"):
        getattr(fake, name).restype = ctypes.c_void_p
    fake.fake_pending.restype = ctypes.c_long
    fake.fake_calls.restype = ctypes.c_long
    fake.fake_fail.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long]
    native.Job = _Job
    spec = json.load(open(spec_path))
    paths, size = spec["paths"], spec["size"]
    segments = [Segment(*s) for s in spec["segments"]]
    want = expected(paths, segments, size)
    for run in spec["runs"]:
        print(json.dumps(fill_once(fake, run, paths, segments, want)), flush=True)


def fill_once(fake, run: dict, paths: list[str], segments: list[Segment], want: bytes) -> dict:
    threads, depth, chunk = run["threads"], run["depth"], run["chunk"]
    for kind in KINDS:
        fake.fake_fail(kind, 0, 0)
    if run.get("fail"):
        fake.fake_fail(*run["fail"])
    dest = (ctypes.c_char * len(want))()
    ring = (ctypes.c_char * (threads * depth * chunk + 4096))()
    KEPT.append((dest, ring))
    base = (ctypes.addressof(ring) + 4095) // 4096 * 4096  # O_DIRECT-sized reads want aligned slots
    streams = [fake.fake_stream() for _ in range(threads)]
    events = [fake.fake_event() for _ in range(threads * depth)]
    context = fake.fake_context() if run.get("context", "fake") == "fake" else 1
    chunks = plan_chunks(segments, chunk)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    out: dict = {"name": run["name"], "planned_copies": sum(len(c.pieces) for c in chunks)}
    cancel = threading.Event()
    if run.get("cancel"):
        fake.fake_hold(1)
        _Job.made.clear()
        threading.Thread(target=release_once_told, args=(fake,), daemon=True).start()
    try:
        filled = native.fill(
            chunks,
            fds,
            [run["direct"]] * len(fds),
            paths,
            [ctypes.addressof(dest)],
            threads=threads,
            depth=depth,
            slot_size=chunk,
            host_base=base,
            # the first progress the fill reports cancels it, as an unload during a load does
            progress=lambda n: cancel.set() if run.get("cancel") else None,
            cancel=cancel,
            context=context,
            streams=streams,
            events=events,
            direct_grid=run.get("grid", 0),
            since=time.perf_counter(),
        )
        out.update(
            exact=dest.raw == want,
            reads=filled.reads,
            copies=filled.copies,
            described=filled.describe(),
            shares=[filled.reading, filled.waiting, filled.queueing, filled.draining],
            span=filled.threads * filled.wall,
        )
    except Exception as exc:
        out.update(error=type(exc).__name__, said=str(exc))
    finally:
        for fd in fds:
            os.close(fd)
    # read once the fill has returned: what the engine left in flight
    out.update(pending=fake.fake_pending(), driver_copies=fake.fake_calls(COPY))
    return out


def release_once_told(fake) -> None:
    """Lets the held copies go once the engine's job carries the cancel."""
    wait_until(lambda: bool(_Job.made) and _Job.made[-1].cancel == 1, CLI_TIMEOUT, "the fill's job to be cancelled")
    fake.fake_hold(0)


if __name__ == "__main__":
    main()
