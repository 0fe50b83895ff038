"""The benchmarks' threaded readers on a CPU: bench_load.run_threads, which both scripts time their
reader threads with, and the raw read loops built on it (no GPU, no daemon)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from hotweights.testing import WAIT_TIMEOUT

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_cold  # noqa: E402
import bench_load  # noqa: E402

KiB = 1024


def test_run_threads_runs_each_at_once_and_times_them_all():
    seen: list[int] = []
    starts: list[float] = []
    ends: list[float] = []
    barrier = threading.Barrier(4, timeout=WAIT_TIMEOUT)  # breaks unless all four run at the same time

    def one(i: int) -> None:
        starts.append(time.perf_counter())
        barrier.wait()
        seen.append(i)
        ends.append(time.perf_counter())

    before = time.perf_counter()
    dt = bench_load.run_threads(one, range(4))
    after = time.perf_counter()
    assert sorted(seen) == [0, 1, 2, 3]
    # the time covers every thread, from the first start to the last end, and nothing outside the call
    assert max(ends) - min(starts) <= dt <= after - before


def test_run_threads_raises_the_first_error_after_every_thread_ended():
    ended: list[int] = []
    failing = threading.Event()

    def one(i: int) -> None:
        if i == 1:
            failing.set()
            raise ValueError("reader 1 failed")
        assert failing.wait(WAIT_TIMEOUT), "reader 1 never ran"  # so these end after reader 1 failed
        ended.append(i)

    with pytest.raises(ValueError, match="reader 1 failed"):
        bench_load.run_threads(one, range(3))
    assert sorted(ended) == [0, 2]


def write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_ranges_read_reads_every_byte(tmp_path):
    paths = [str(tmp_path / f"{i}.bin") for i in range(3)]
    sizes = [100 * KiB + 7, 64 * KiB, 1]
    for p, n in zip(paths, sizes):
        write(Path(p), n)
    bufs = bench_cold.HostBuffers(touch=False)
    try:
        total, dt, _ = bench_cold.ranges_read(paths, 16 * KiB, 4, bufs)
    finally:
        bufs.close()
    assert total == sum(sizes) and dt > 0


def test_ranges_read_raises_a_readers_error(tmp_path, monkeypatch):
    p = tmp_path / "a.bin"
    write(p, 64 * KiB)
    real = os.path.getsize
    monkeypatch.setattr(os.path, "getsize", lambda q: 128 * KiB if str(q) == str(p) else real(q))  # shorter than told
    bufs = bench_cold.HostBuffers(touch=False)
    try:
        with pytest.raises(OSError, match="short read"):
            bench_cold.ranges_read([str(p)], 16 * KiB, 2, bufs)
    finally:
        bufs.close()


class FakeRing:
    """What raw_read uses of a pinned ring: slot size, thread count, and a slot's buffer."""

    def __init__(self, threads: int, slot_size: int) -> None:
        self.threads, self.slot_size = threads, slot_size
        self.bufs = [(ctypes.c_char * slot_size)() for _ in range(threads)]

    def slot(self, w: int, k: int):
        return None, memoryview(self.bufs[w]).cast("B")


def test_raw_read_reads_whole_files_buffered(tmp_path):
    paths = [str(tmp_path / f"{i}.bin") for i in range(2)]
    for p, n in zip(paths, (50 * KiB + 3, 8 * KiB)):
        write(Path(p), n)
    nbytes, dt, fallbacks = bench_load.raw_read(paths, FakeRing(3, 16 * KiB), direct=False)
    assert nbytes == 58 * KiB + 3 and dt > 0 and fallbacks == 0


@pytest.mark.parametrize("ring_slot", [0, 64 * KiB])
def test_native_read_reads_every_byte_into_regions_or_ring_slots(tmp_path, ring_slot):
    from hotweightsd.loaders import native

    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    paths = [str(tmp_path / f"{i}.bin") for i in range(2)]
    for p, n in zip(paths, (200 * KiB + 3, 40 * KiB)):
        write(Path(p), n)
    bufs = bench_cold.HostBuffers(kind="private")
    try:
        nbytes, dt, said = bench_cold.native_read(paths, 16 * KiB, 3, True, bufs, ring_slot=ring_slot)
        assert nbytes == 240 * KiB + 3 and dt > 0
        assert said.startswith("readers ") and "% reading" in said, said
        assert list(bufs.maps) == [3 * (2 * ring_slot if ring_slot else 16 * KiB)]
    finally:
        bufs.close()


def test_interleaved_rounds_rotate_so_no_label_always_runs_first_or_after_the_same_one():
    order: list[str] = []

    def once(label: str) -> float:
        order.append(label)
        return float(len(order))

    out = bench_cold.interleaved(["a", "b", "c", "d"], 4, once, lambda: 1e9, 1.0)
    assert "".join(order) == "abcd" + "badc" + "dcab" + "dcba"  # every other round backwards
    before_a = {order[i - 1] for i in range(1, len(order)) if order[i] == "a"}
    assert len(before_a) > 1, order
    assert out["b"]["samples"] == [2.0, 5.0, 12.0, 15.0]  # in round order
    for n in range(2, 8):  # however many labels: each gets every round, none runs twice in a row
        order.clear()
        labels = [chr(ord("a") + i) for i in range(n)]
        out = bench_cold.interleaved(labels, 5, once, lambda: 1e9, 1.0)
        assert all(len(out[k]["samples"]) == 5 for k in labels), (n, order)
        assert all(x != y for x, y in zip(order, order[1:])), (n, order)
        if n > 2:  # two labels cannot take turns first without one running twice in a row
            assert len({order[i * n] for i in range(5)}) > 1, (n, order)
    # a short budget ends after the first round, never before it
    order.clear()
    assert set(bench_cold.interleaved(["a", "b"], 5, once, lambda: 0.0, 1.0)) == {"a", "b"} and len(order) == 2


def test_a_probe_shape_is_recorded_apart_and_never_the_ceiling():
    spreads = {
        "odirect 4MiB x16": {"median": 1.5},
        "odirect 512KiB x16 into pinned huge pages": {"median": 9.0},  # a probe, faster than the ceiling's shapes
        "odirect 64MiB x16": {"median": 2.0},
    }
    raw = bench_cold.raw_record(spreads)
    assert raw["ceiling"] == 2.0 and raw["ceiling_shape"] == "odirect 64MiB x16"
    assert list(raw["probes"]) == ["odirect 512KiB x16 into pinned huge pages"]
    assert list(raw["shapes"]) == ["odirect 4MiB x16", "odirect 64MiB x16"]


def test_every_read_shape_names_a_memory_the_benchmark_makes_and_a_size_on_the_direct_grid():
    for name, (kind, size, threads, memory, request, slot) in {
        **bench_cold.RAW_SHAPES,
        **bench_cold.PROBE_SHAPES,
    }.items():
        assert kind in ("odirect", "ranges"), name
        assert memory in bench_cold.BUFFER_KINDS, name
        assert threads > 0 and size % (4 * KiB) == 0 and request % (4 * KiB) == 0, name
        assert slot == 0 or (slot >= size and slot % (4 * KiB) == 0 and kind == "odirect"), name
    assert not set(bench_cold.RAW_SHAPES) & set(bench_cold.PROBE_SHAPES)


def test_the_raw_shapes_hold_the_loaders_own_default_shape_in_its_own_memory():
    from hotweightsd.loaders import native

    if native.unavailable_reason():
        pytest.skip(f"the loader's cold shape is the native engine's: {native.unavailable_reason()}")
    from hotweightsd.loaders.path import choose
    from hotweightsd.loaders.settings import LoaderSettings

    # the benchmark runs on a 16-core machine with the native engine: the loader's cold reads there
    path = choose(LoaderSettings(gds="off"), cores=16, real_driver=True)
    memory = {"huge": "pinned-thp", "driver": "pinned"}[path.ring_memory]
    size = path.direct_chunk or path.chunk_size
    request = path.direct_request if path.direct_request < size else 0
    assert path.depth == 2, "the ring's shape reads into two slots a reader"
    own = ("odirect", size, path.threads, memory, request, path.slot_size)
    assert own in bench_cold.RAW_SHAPES.values()
