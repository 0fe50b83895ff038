#!/usr/bin/env python3
"""Cold and partly cached loads: the raw read ceiling, and the daemon's read modes against each other.

One run writes one rank of a Llama-70B-like TP shard (``bench_load.make_checkpoint``; ``--rank-gb`` in
``--files`` files) on a disk (``--workdir``, not tmpfs) and measures, every figure a median of ``--reps``
interleaved repetitions (A B C, B C A, C A B, ...) with its min and max, the cold rotation's after one
untimed round of every label (``--no-warm-up-round``: none):

- ``raw``: the cold read ceiling, the best of several read shapes into host memory with no GPU copy:
  O_DIRECT at 512 KiB, 4 MiB and 64 MiB with 16 readers, O_DIRECT 1 MiB with 64 readers (a deep queue),
  all on the native engine's C loop (host mode, no copies) into private anonymous memory, buffered reads
  with each of 16 threads reading its own contiguous range (4 MiB reads, python threads), three O_DIRECT
  shapes into huge pages, and the loader's own shape, O_DIRECT 512 KiB x 12 into ``cuMemHostAlloc`` memory
  laid out as its ring (two 4 MiB slots a reader, each read at a slot's start; not with ``--smoke``): what
  the fill would reach if its copies cost nothing (benchmarks/README.md, "Reading older results": raw shapes
  of older JSON files read into other memory), and ``huge_share``: the share of each kind of memory they
  read into that the kernel backed with huge pages;
- ``cold``: the daemon (``hotweights serve``, one per read mode of ``--modes``: auto, pread, odirect, each
  optionally with config keys set, ``auto+loader_threads=16``: an A/B of a setting in one rotation)
  loading the rank with every file dropped from the page cache, and in the same rotation each installed peer
  of ``--peers`` (safetensors, fastsafetensors, Run:ai model streamer, InstantTensor; ``bench_load``'s
  loaders, in this process, each after one untimed load of the smallest file) loading the same files cold
  onto cuda:0; a peer not installed is recorded as skipped with the reason;
- ``partial_files``: the same with half of the files read into the page cache before each repetition and
  the others dropped;
- ``partial_halves``: the same with the first half of every file cached and the second half dropped (the
  files auto reads both ways);
- ``sweep``: O_DIRECT and buffered reads on the native engine, read size x readers, cold, over the first
  ``--sweep-gb`` of the rank (one pass each); ``--sweep-only`` runs nothing else.

Pages are dropped per file with POSIX_FADV_DONTNEED after an fsync (no root needed); what stayed resident
is measured with mincore and written beside each figure. ``targets.partial_*`` says whether auto beat both
fixed modes in that run; ``targets.cold`` also compares auto with the best peer of the same rotation
(``met_peers``: >= 1.1x its median) and with the raw ceiling (``met_ceiling``: >= 0.95x). Writes
``cold-<gpu>-<date>.json`` into each ``--out`` (default benchmarks/results/) after every section.
``--smoke``: the cpu backend and a checkpoint of a few MB, to check the plumbing anywhere (the cpu backend
reads buffered whatever the read mode: its figures compare nothing; the peers, which load onto a GPU, are
recorded as skipped). Rates are GB/s (1e9 bytes) of file bytes for raw reads, of tensor bytes for loads.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_load as bl  # noqa: E402  (needs benchmarks/ on sys.path first)

ROOT, GB, MiB, KiB = bl.ROOT, bl.GB, bl.MiB, 1024
MODES = ("auto", "pread", "odirect")


def mode_env(label: str) -> dict[str, str]:
    """The daemon's environment for a ``--modes`` entry: a read mode, then ``+key=value`` config keys (keys
    the daemon's config has, other than the read mode the label starts with)."""
    from hotweightsd import config

    mode, *pairs = label.split("+")
    if mode not in MODES:
        raise ValueError(f"{label!r}: the read mode must be one of {', '.join(MODES)}")
    known = {f.name for f in config.keys()} - {"loader"}
    env = {config.env_name("loader"): mode}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"{label!r}: {kv!r} is not key=value")
        if key not in known:
            raise ValueError(f"{label!r}: {key!r} is not a config key the label may set (the read mode comes first)")
        env[config.env_name(key)] = value
    return env


# --- the page cache -----------------------------------------------------------------------------------------


def drop(path: str, offset: int = 0, length: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache(path: str, offset: int = 0, length: int | None = None) -> None:
    """Reads ``[offset, offset + length)`` into the page cache (no readahead past it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        end = os.fstat(fd).st_size if length is None else offset + length
        buf = bytearray(8 * MiB)
        pos = offset
        while pos < end:
            n = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                break
            pos += n
    finally:
        os.close(fd)


def resident(paths: list[str]) -> list[float]:
    """Each file's resident fraction (mincore over a sample; reads no data)."""
    from hotweightsd.loaders import residency

    out = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            out.append(round(residency.sampled_fraction(fd)[0], 3))
        finally:
            os.close(fd)
    return out


def prepare(paths: list[str], scenario: str) -> list[float]:
    """Leaves ``paths`` as ``scenario`` says (cold | partial_files | partial_halves); returns what is resident."""
    for p in paths:
        drop(p)
    if scenario == "partial_files":
        for p in paths[: len(paths) // 2]:
            cache(p)
    elif scenario == "partial_halves":
        for p in paths:
            cut = os.path.getsize(p) // 2 // MiB * MiB
            cache(p, 0, cut)
            drop(p, cut)
    return resident(paths)


def tiny_checkpoint(root: Path, files: int, res: bl.Results) -> dict:
    """Smoke mode: one rank of 24 MB (the real layout's embedding alone is 0.5 GB), the same file naming."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    pool = memoryview(np.random.default_rng(1234).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes())
    tensors = [(f"model.layers.{i}.mlp.up_proj.weight", (1024, 1024), "BF16") for i in range(12)]
    per = -(-len(tensors) // files)
    nbytes = sum(
        bl.write_safetensors(root / f"model-rank-0-part-{p}.safetensors", tensors[p * per : (p + 1) * per], pool, p)
        for p in range(files)
    )
    res.note(f"smoke checkpoint: {nbytes / 1e6:.1f} MB, {len(tensors)} tensors in {files} files")
    return {"path": str(root), "files_per_rank": files, "bytes_per_rank": nbytes, "layout": "smoke: 2 MB bf16 tensors"}


# --- raw reads ------------------------------------------------------------------------------------------------


BUFFER_KINDS = ("private", "shared", "thp", "pinned", "pinned-thp")


class HostBuffers:
    """Host memory for the raw readers, one region per size, made and touched before anything is timed.

    ``kind``: ``private`` anonymous memory (the default); ``shared``, an anonymous shared mapping (shmem);
    ``thp``, private with ``MADV_HUGEPAGE``; ``pinned``, ``cuMemHostAlloc`` as the loader's ring (needs a
    GPU); ``pinned-thp``, ``thp`` registered with ``cuMemHostRegister``."""

    def __init__(self, touch: bool = True, kind: str = "private") -> None:
        if kind not in BUFFER_KINDS:
            raise ValueError(f"buffer kind {kind!r}: one of {', '.join(BUFFER_KINDS)}")
        self.touch = touch
        self.kind = kind
        # size -> [address, mapping, ctypes anchor] (None, None for the driver's memory): a list, so that
        # releasing it can drop the anchor, the last reference into the mapping, before closing the mapping
        self.maps: dict[int, list] = {}

    def get(self, nbytes: int) -> int:
        if nbytes not in self.maps:
            self.maps[nbytes] = self._make(nbytes)
        return self.maps[nbytes][0]

    def _make(self, nbytes: int) -> list:
        from hotweights.cuda import devices as cd
        from hotweightsd.loaders import hostmem

        if self.kind == "pinned":
            with cd.current(0) as drv:
                flags = int(drv.CU_MEMHOSTALLOC_PORTABLE)
                return [int(cd.check(drv.cuMemHostAlloc(nbytes, flags), "cuMemHostAlloc", bytes=nbytes)), None, None]
        if self.kind == "pinned-thp":  # as the loader's ring_memory = huge makes it
            with cd.current(0) as drv:
                huge = hostmem.registered(drv, nbytes, self.touch)
            return [huge.ptr, huge, None]
        if self.kind == "thp":
            huge = hostmem.HugePages(nbytes, self.touch)
            return [huge.ptr, huge, None]
        if self.kind == "shared":
            m = mmap.mmap(-1, nbytes)
            anchor = ctypes.c_char.from_buffer(m)
            ptr = ctypes.addressof(anchor)
        else:  # from a 2 MiB boundary, as the huge-page kinds, so that only the page size differs
            m = mmap.mmap(-1, nbytes + hostmem.HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            anchor = ctypes.c_char.from_buffer(m)
            ptr = -(-ctypes.addressof(anchor) // hostmem.HUGE) * hostmem.HUGE
        if self.touch:
            ctypes.memset(ptr, 1, nbytes)
        return [ptr, m, anchor]

    def huge_share(self) -> float | None:
        """The share of the regions the kernel backs with huge pages (``AnonHugePages`` of their mappings in
        /proc/self/smaps); None for memory the driver mapped (``pinned``) or before any region exists."""
        if self.kind == "pinned" or not self.maps:
            return None
        from hotweightsd.loaders import hostmem

        return hostmem.huge_share((entry[0], entry[0] + n) for n, entry in self.maps.items())

    def close(self) -> None:
        """Gives every region back, one at a time (forgotten before it is released, so a failure never
        frees one twice); the first failure is raised once the rest are released."""
        failed: BaseException | None = None
        while self.maps:
            try:
                self._release(self.maps.popitem()[1])
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def _release(self, entry: list) -> None:
        from hotweights.cuda import devices as cd

        ptr, m = entry[0], entry[1]
        entry.clear()  # the anchor into the mapping goes with it
        try:
            if self.kind in ("pinned", "pinned-thp"):
                with cd.current(0) as drv:
                    if self.kind == "pinned":
                        cd.check(drv.cuMemFreeHost(ptr), "cuMemFreeHost")
                    else:
                        cd.check(drv.cuMemHostUnregister(ptr), "cuMemHostUnregister")
        finally:
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    print(f"bench_cold: a {self.kind} buffer is still referenced and stays mapped", file=sys.stderr)


def native_read(
    paths: list[str],
    size: int,
    threads: int,
    direct: bool,
    bufs: HostBuffers,
    limit: int = 0,
    request: int = 0,
    ring_slot: int = 0,
) -> tuple[int, float, str]:
    """The bytes of ``paths`` (the first ``limit`` of them, when given) in ``size`` reads on the native
    engine's C threads (host mode, no copies); ``request``: the most bytes per pread of an O_DIRECT read;
    ``ring_slot``: each reader reads into two slots of this size in turn, as in the loader's ring. Returns
    the bytes, the seconds and what the engine said of its readers' time (as a load's description does)."""
    from hotweightsd.loaders import native
    from hotweightsd.loaders.files import open_source
    from hotweightsd.loaders.plan import ReadChunk

    sizes = [os.path.getsize(p) for p in paths]
    chunks = [ReadChunk(i, off, min(size, n - off), ()) for i, n in enumerate(sizes) for off in range(0, n, size)]
    if limit:
        ends = itertools.accumulate(c.length for c in chunks)
        chunks = [c for c, end in zip(chunks, ends) if end - c.length < limit]
    threads = max(1, min(threads, len(chunks)))
    depth, slot = (2, ring_slot) if ring_slot else (1, size)
    base = bufs.get(threads * depth * slot)
    opened = [open_source(p, direct) for p in paths]
    try:
        t0 = time.perf_counter()
        filled = native.fill(
            chunks,
            [fd for fd, _ in opened],
            [d for _, d in opened],
            paths,
            [0],
            threads=threads,
            depth=depth,
            slot_size=slot,
            host_base=base,
            progress=lambda n: None,
            cancel=threading.Event(),
            host_mode=True,
            direct_request=request,
        )
        dt = time.perf_counter() - t0
    finally:
        for fd, _ in opened:
            os.close(fd)
    return sum(c.length for c in chunks), dt, filled.describe()


def ranges_read(paths: list[str], size: int, threads: int, bufs: HostBuffers) -> tuple[int, float, str]:
    """Buffered reads, each of ``threads`` python threads reading its own contiguous share of the bytes."""
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    share = -(-total // threads)
    base = bufs.get(threads * size)
    fds = [os.open(p, os.O_RDONLY) for p in paths]

    def worker(w: int) -> None:
        view = memoryview((ctypes.c_char * size).from_address(base + w * size)).cast("B")
        lo, hi = w * share, min(total, (w + 1) * share)
        start = 0
        for fd, n in zip(fds, sizes):
            a, b = max(lo, start), min(hi, start + n)
            pos = a
            while pos < b:
                got = os.preadv(fd, [view[: min(size, b - pos)]], pos - start)
                if got <= 0:
                    raise OSError(f"short read at {pos - start}")
                pos += got
            start += n

    try:
        dt = bl.run_threads(worker, range(threads))
    finally:
        for fd in fds:
            os.close(fd)
    return total, dt, ""


class Shape(NamedTuple):
    """A raw read shape: ``kind`` (odirect or ranges), read ``size``, readers, the memory read into, the most
    bytes per request (0: the read's), and ``ring_slot``: read into slots of this size, two a reader, at each
    slot's start, as the loader's ring holds its reads (0: each reader's reads into one region of ``size``)."""

    kind: str
    size: int
    threads: int
    memory: str
    request: int = 0
    ring_slot: int = 0


RAW_SHAPES: dict[str, Shape] = {
    "odirect 512KiB x16": Shape("odirect", 512 * KiB, 16, "private", 0),
    "odirect 4MiB x16": Shape("odirect", 4 * MiB, 16, "private", 0),
    "odirect 64MiB x16": Shape("odirect", 64 * MiB, 16, "private", 0),
    "odirect 1MiB x64 (deep queue)": Shape("odirect", 1 * MiB, 64, "private", 0),
    "buffered 4MiB x16 per-thread ranges": Shape("ranges", 4 * MiB, 16, "private", 0),
    # memory of 2 MiB pages takes an O_DIRECT request in a few segments, scattered 4 KiB pages in one a page:
    # on a disk that caps the segments of a request the memory is part of the read's shape
    "odirect 512KiB x16 into huge pages": Shape("odirect", 512 * KiB, 16, "thp", 0),
    "odirect 64MiB x16 into huge pages": Shape("odirect", 64 * MiB, 16, "thp", 0),
    "odirect 1MiB x64 (deep queue) into huge pages": Shape("odirect", 1 * MiB, 64, "thp", 0),
    # the loader's own shape, memory and slots, without its copies: what the fill would reach if copying were free
    "odirect 512KiB x12 into the ring's pinned memory": Shape("odirect", 512 * KiB, 12, "pinned", 0, 4 * MiB),
}
# --probe-shapes: read like the shapes above, kept out of the ceiling. The loader's shape into the memory
# of a huge-page ring (ring_memory = huge), and the fastest shape's reads into huge pages registered with
# the driver as that ring is (does registering them cost the reads anything).
PROBE_SHAPES: dict[str, Shape] = {
    "odirect 512KiB x12 into the ring's pinned huge pages": Shape("odirect", 512 * KiB, 12, "pinned-thp", 0, 4 * MiB),
    "odirect 512KiB x16 into pinned huge pages": Shape("odirect", 512 * KiB, 16, "pinned-thp", 0),
}


def raw_record(spreads: dict[str, dict]) -> dict:
    """``doc["raw"]`` from the raw shapes' spreads: the probe shapes set apart, the ceiling the best median of
    the rest (at least one of which was read)."""
    shapes = {k: v for k, v in spreads.items() if k not in PROBE_SHAPES}
    best = max(shapes, key=lambda k: shapes[k]["median"])
    probes = {k: v for k, v in spreads.items() if k in PROBE_SHAPES}
    return {"shapes": shapes, "probes": probes, "ceiling": shapes[best]["median"], "ceiling_shape": best}


def raw_once(paths: list[str], shape: str, bufs: dict[str, HostBuffers]) -> tuple[int, float, str]:
    kind, size, threads, memory, request, ring_slot = RAW_SHAPES.get(shape) or PROBE_SHAPES[shape]
    if kind == "ranges":
        return ranges_read(paths, size, threads, bufs[memory])
    return native_read(paths, size, threads, kind == "odirect", bufs[memory], request=request, ring_slot=ring_slot)


def spread(samples: list[float]) -> dict:
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "samples": [round(s, 3) for s in samples],
    }


def interleaved(labels: list[str], reps: int, once: Callable[[str], float], budget: Callable[[], float], need: float):
    """``once(label)`` for A B C D, B A D C, D C A B, D C B A, ...: ``reps`` rounds (fewer where the budget
    runs short, never fewer than one), each round starting one label later, every other round run backwards,
    and no round starting with the label that ended the one before, so no label always runs first, always
    follows the same one or runs twice in a row (a rate must not depend on a pass's place in the round or on
    the pass before it); {label: spread of the rates}, the samples in round order."""
    got: dict[str, list[float]] = {k: [] for k in labels}
    last = None
    n = max(1, len(labels))
    for r in range(reps):
        if r and budget() < need * len(labels):
            break
        if r % 2:  # backwards, from the round's first label: the one after it in the list is now the last
            shift = (r + 1) % n
            order = (labels[shift:] + labels[:shift])[::-1]
        else:
            order = labels[r % n :] + labels[: r % n]
        if len(order) > 1 and order[0] == last:
            order[0], order[1] = order[1], order[0]
        last = order[-1] if order else None
        for k in order:
            v = once(k)  # None: no figure (a peer that failed)
            if v is not None:
                got[k].append(v)
    return {k: spread(v) for k, v in got.items() if v}


# --- the daemon ---------------------------------------------------------------------------------------------------


class Daemons:
    """One daemon per read mode, on their own sockets."""

    def __init__(self, backend: str, res: bl.Results, modes: list[str]) -> None:
        from hotweights.testing import Daemon

        self.dir = tempfile.mkdtemp(prefix="hwc-", dir="/tmp")
        self.daemons: dict[str, Daemon] = {}
        self.clients: dict = {}
        for k, mode in enumerate(modes):  # started together, waited for in turn
            self.daemons[mode] = Daemon.start(
                os.path.join(self.dir, f"d{k}.sock"),
                backend=backend,
                log=os.path.join(self.dir, f"d{k}.log"),
                extra_env=mode_env(mode),
                wait=False,
            )
        try:
            for mode, d in self.daemons.items():
                d.wait_ready()
                self.clients[mode] = d.connect()
        except BaseException:
            self.close()
            raise
        res.note(f"daemons up, one per read mode ({backend} backend)")

    def load(self, mode: str, ckpt: Path) -> dict:
        client = self.clients[mode]
        t0 = time.perf_counter()
        info = client.load("cold", str(ckpt))
        dt = time.perf_counter() - t0
        client.unload("cold", force=True)
        return {
            "gbps": bl.rate(info.bytes, dt),
            "seconds": round(dt, 3),
            "daemon_load_seconds": round(info.load_seconds, 3),
            "bytes": info.bytes,
            "load_path": info.load_path,
        }

    def close(self) -> dict:
        logs = {}
        for mode, d in self.daemons.items():
            try:
                if mode in self.clients:
                    self.clients[mode].close()
            except Exception:
                pass
            d.stop(timeout=20)
            logs[mode] = d.logs()[-1500:]
        shutil.rmtree(self.dir, ignore_errors=True)
        return logs


# --- main ------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", action="append", default=None, help="folder for the JSON (repeatable)")
    ap.add_argument("--workdir", default="/tmp/hw-cold", help="where the checkpoint is written (a disk, not tmpfs)")
    ap.add_argument("--rank-gb", type=float, default=8.5)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every figure (at least 3)")
    ap.add_argument("--sweep-gb", type=float, default=1.0, help="bytes of the rank the sweep reads (GB)")
    ap.add_argument("--sweep-sizes-kib", default="256,1024,4096,16384,65536")
    ap.add_argument("--sweep-threads", default="4,16,64")
    ap.add_argument(
        "--pretouch-gb", type=float, default=16.0, help="fresh memory touched while the checkpoint is written"
    )
    ap.add_argument("--skip", default="", help="comma list of: raw, cold, partial_files, partial_halves, sweep")
    ap.add_argument("--modes", default=",".join(MODES), help="the daemon's read modes measured (comma list)")
    ap.add_argument(
        "--peers",
        default=",".join(bl.PEERS),
        help=f"peers loaded cold in the cold rotation (comma list of {', '.join(bl.PEERS)}; '' for none)",
    )
    ap.add_argument("--sweep-only", action="store_true", help="only the read size x readers sweep")
    ap.add_argument(
        "--ceiling-in-rotation",
        action="store_true",
        help="the raw read shapes take their turns in the cold rotation beside the loads, instead of a section "
        "of their own before it: ceiling and loads then see the same stretch of the disk's life",
    )
    ap.add_argument(
        "--probe-shapes",
        action="store_true",
        help=f"also read {', '.join(PROBE_SHAPES)}: recorded beside the raw shapes, never the ceiling",
    )
    ap.add_argument(
        "--no-warm-up-round",
        action="store_true",
        help="time the cold rotation's first round too (default: every label of it runs once untimed before the "
        "timed rounds, its rates kept apart as warm_up_round)",
    )
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are cut short past it")
    ap.add_argument("--smoke", action="store_true", help="cpu backend, a checkpoint of a few MB, no GPU needed")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    try:
        for m in modes:
            mode_env(m)
    except ValueError as exc:
        ap.error(f"--modes: {exc}")
    if not modes:
        ap.error(f"--modes: a comma list of {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        ap.error("--modes: a label given twice (each runs its own daemon)")
    if set(peers) - set(bl.PEERS):
        ap.error(f"--peers: a comma list of {', '.join(bl.PEERS)}")

    res = bl.Results(args.out or [str(ROOT / "benchmarks" / "results")])
    deadline = time.monotonic() + args.budget
    budget = lambda: deadline - time.monotonic()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    scenarios = [s for s in ("cold", "partial_files", "partial_halves") if s not in skip]
    if args.sweep_only:
        skip |= {"raw"}
        scenarios = []
    doc = res.doc
    doc["args"] = vars(args)
    doc["peers_versions"] = {p: bl._version(bl.PEER_DISTS[p]) for p in peers}

    from hotweights.cuda import devices as cd
    from hotweightsd.loaders import native

    if args.smoke:
        backend, gpu, rank_gb = "cpu", "cpu-smoke", 0.0
    else:
        if cd.device_count() == 0:
            doc["fatal"] = f"no GPU: {cd.unavailable_reason()} (--smoke checks the plumbing without one)"
            res.note(doc["fatal"])
            res.save()
            return 2
        backend, gpu, rank_gb = "cuda", cd.device_name(0), args.rank_gb
    res.set_name(gpu)
    res.name = "cold-" + (res.name or "").removeprefix("bench-")
    doc["machine"] = {
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "native": native.unavailable_reason() or "built",
        # tells two runs on one machine (booted once) from runs on two
        "boot_id": bl.boot_id(),
    }
    if native.unavailable_reason():
        doc["fatal"] = f"the raw read shapes run on the native engine: {native.unavailable_reason()}"
        res.note(doc["fatal"])
        res.save()
        return 2

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    if args.smoke:
        doc["checkpoint"] = tiny_checkpoint(ckpt, args.files, res)
    else:  # fresh guest memory is slow on first touch (bench_load's note): touched while the files are written
        touch = threading.Thread(target=lambda: doc.setdefault("pretouch_s", bl.pretouch(int(args.pretouch_gb * GB))))
        touch.start()
        doc["checkpoint"] = bl.make_checkpoint(ckpt, 1, rank_gb * GB, args.files, 8, res)
        touch.join()
    paths = bl.rank_files(ckpt, 0)
    fd = os.open(paths[0], os.O_RDONLY)
    try:
        from hotweightsd.loaders import residency

        doc["checkpoint"]["filesystem"] = residency.filesystem_of(fd)[1]
    finally:
        os.close(fd)
    after_drop = prepare(paths, "cold")
    doc["drop_check"] = {"resident_after_dontneed": after_drop}
    if max(after_drop) > 0.05:
        res.note(f"POSIX_FADV_DONTNEED left pages resident here ({after_drop}): cold figures are not cold")
    res.save()
    nbytes = sum(os.path.getsize(p) for p in paths)
    # seconds per cold pass: a guess from the checkpoint's size until a raw read measures one
    pass_s = [nbytes / GB + 1.0 if not args.smoke else 0.5]

    def cold_rate(n: int, dt: float) -> float:
        pass_s[0] = max(pass_s[0] * 0.5, dt)  # the budget's guess of a cold pass, from the latest
        return bl.rate(n, dt)

    def timed(label: str, fn: Callable[[], tuple[int, float, str]], scenario: str = "cold") -> float:
        prepare(paths, scenario)
        n, dt, _ = fn()
        return cold_rate(n, dt) if scenario == "cold" else bl.rate(n, dt)

    targets = doc.setdefault("targets", {})
    read_shapes = {**RAW_SHAPES, **(PROBE_SHAPES if args.probe_shapes else {})}
    memories = {s.memory for s in read_shapes.values() if not (args.smoke and s.memory.startswith("pinned"))}
    bufs = {m: HostBuffers(touch=not args.smoke, kind=m) for m in memories}

    # the raw shapes this run can read: those whose memory it has (smoke runs have no pinned memory)
    shapes_here = [k for k, s in read_shapes.items() if s.memory in bufs]

    def section(name: str, fn, need: float, why_not: str | None = None):
        return bl.run_section(res, skip, budget, name, fn, need, why_not)

    # -- the cold ceiling: the best raw read shape
    def raw():
        out = interleaved(
            shapes_here, args.reps, lambda s: timed(s, lambda: raw_once(paths, s, bufs)), budget, pass_s[0] + 2
        )
        raw_doc = doc["raw"] = raw_record(out)
        res.note(
            f"cold ceiling: {raw_doc['ceiling']} GB/s ({raw_doc['ceiling_shape']}); "
            + ", ".join(f"{k} {v['median']}" for k, v in raw_doc["shapes"].items())
        )

    # the shapes that run inside the cold rotation instead (labels of their own there)
    rotate = args.ceiling_in_rotation and "cold" in scenarios and "raw" not in skip
    in_rotation = shapes_here if rotate else []
    section(
        "raw",
        raw,
        need=20 * pass_s[0] if not args.smoke else 5,
        why_not="to be measured inside the cold rotation (--ceiling-in-rotation)" if in_rotation else None,
    )

    # -- the daemon's read modes, cold and partly cached
    daemons: Daemons | None = None
    try:
        daemons = Daemons(backend, res, modes) if scenarios else None
        for scenario in scenarios:

            def run(scenario=scenario):
                seen: dict[str, list] = {}
                peer_doc: dict[str, dict] = {}
                if scenario == "cold":
                    for p in peers:
                        why = "--smoke: the peers load onto cuda:0" if args.smoke else bl.peer_available(p)
                        if why:
                            peer_doc[p] = {"status": f"skipped: {why}"}
                            res.note(f"peer {p} skipped: {why}")
                ready = [p for p in peers if scenario == "cold" and p not in peer_doc]
                if ready:  # the CUDA context of this process, made before anything is timed
                    import torch

                    torch.zeros(1, device="cuda:0")
                    torch.cuda.synchronize(0)
                failed: dict[str, str] = {}
                warmup: dict[str, float] = {}
                for p in ready:  # one untimed load of the smallest file: one-time setup out of the figures
                    try:
                        t0 = time.perf_counter()
                        bl.load_peer(p, [min(paths, key=os.path.getsize)], 0)
                        warmup[p] = round(time.perf_counter() - t0, 3)
                    except Exception as exc:
                        res.error(f"{p} warm-up", exc)
                        failed[p] = f"failed: {type(exc).__name__}: {exc}"
                    finally:
                        bl.free_torch()

                def once(label: str) -> float | None:
                    if label in failed:
                        return None
                    before = prepare(paths, scenario)
                    seen.setdefault("resident_before", []).append(before)
                    if label in raw_labels:
                        try:
                            n, dt, said = raw_once(paths, label, bufs)
                        except Exception as exc:  # one shape failing costs its own figures, not the round's
                            res.error(f"raw {label}", exc)
                            failed[label] = f"failed: {type(exc).__name__}: {exc}"
                            return None
                        if said:
                            seen.setdefault(f"engine {label}", []).append(said)
                        return cold_rate(n, dt)
                    if label in modes:
                        assert daemons is not None
                        r = daemons.load(label, ckpt)
                        seen.setdefault(label, []).append(r["load_path"])
                        seen.setdefault(f"seconds {label}", []).append([r["seconds"], r["daemon_load_seconds"]])
                        return r["gbps"]
                    seen.setdefault(f"peer {label}", []).append(max(before, default=0.0))
                    try:
                        t0 = time.perf_counter()
                        n = bl.load_peer(label, paths, 0)
                        dt = time.perf_counter() - t0
                    except Exception as exc:
                        res.error(f"{label} {scenario}", exc)
                        failed[label] = f"failed: {type(exc).__name__}: {exc}"
                        return None
                    finally:
                        bl.free_torch()
                    seen.setdefault(f"bytes {label}", [n])
                    return bl.rate(n, dt)

                raw_labels = in_rotation if scenario == "cold" else []
                labels = modes + [p for p in ready if p not in failed] + raw_labels
                warm_up: dict[str, float | None] = {}
                if scenario == "cold" and not args.no_warm_up_round and len(labels) > 1:
                    # On a freshly started machine the first cold passes run slower for whatever reads them (the
                    # label the rotation starts with most), so one untimed round gives every label its first pass.
                    warm_up = {k: once(k) for k in labels}
                    seen.clear()
                labels = [k for k in labels if k not in failed]
                out = interleaved(labels, args.reps, once, budget, pass_s[0] + 4)
                spreads = {k: out.pop(k) for k in raw_labels if k in out}
                if any(k in RAW_SHAPES for k in spreads):
                    doc["raw"] = {
                        **raw_record(spreads),
                        "in_rotation": True,
                        "failed": {k: failed[k] for k in raw_labels if k in failed},
                        # the last pass of each, to set beside the loads' own (cold.load_paths)
                        "engine_said": {k: seen[f"engine {k}"][-1] for k in raw_labels if f"engine {k}" in seen},
                    }
                befores = seen.get("resident_before") or [[0.0]]
                doc[scenario] = {
                    "modes": {m: v for m, v in out.items() if m in modes},
                    "load_paths": {m: seen.get(m, [])[-1:] for m in modes},
                    # per load: [seconds the client waited, seconds the daemon's fill took]
                    "load_seconds": {m: seen.get(f"seconds {m}", []) for m in modes},
                    "rotation": labels,
                    "warm_up_round": warm_up,
                    "resident_before_each_load": seen.get("resident_before"),
                }
                for p in ready:
                    if p in out:
                        peer_doc[p] = {
                            "status": "ok",
                            **out[p],
                            "bytes": seen[f"bytes {p}"][0],
                            "max_resident_before": seen[f"peer {p}"],
                            "warmup_s": warmup.get(p),
                        }
                        if p in failed:  # its figures before the failure still count
                            peer_doc[p]["error"] = failed[p]
                    else:
                        peer_doc[p] = {"status": failed.get(p, "no figure")}
                if scenario == "cold":
                    doc[scenario]["peers"] = {p: peer_doc[p] for p in peers}
                    worst = max(max(b, default=0.0) for b in befores)
                    doc[scenario]["max_resident_before_a_load"] = worst
                    if worst > 0.05:
                        res.note(f"a file was {worst:.0%} resident before a cold load: the cold figures are not cold")
                med = {m: out[m]["median"] for m in modes if m in out}
                auto = med.get("auto")
                fixed = [med[m] for m in ("pread", "odirect") if m in med]
                best_fixed = max(fixed, default=None)
                t = targets[scenario] = {
                    "auto": auto,
                    "pread": med.get("pread"),
                    "odirect": med.get("odirect"),
                    "auto_over_best_fixed": round(auto / best_fixed, 3) if auto and best_fixed else None,
                    "auto_beats_both": auto > best_fixed if auto is not None and len(fixed) == 2 else None,
                }
                if scenario == "cold":
                    ceiling = doc.get("raw", {}).get("ceiling")
                    if ceiling:
                        t["ceiling"] = ceiling
                        t["auto_over_ceiling"] = round(auto / ceiling, 3) if auto else None
                    t["met_ceiling"] = bool(auto >= 0.95 * ceiling) if auto and ceiling else None
                    ok = {p: v["median"] for p, v in peer_doc.items() if v.get("status") == "ok"}
                    best = max(ok, key=lambda p: ok[p]) if ok else None
                    ratio = round(auto / ok[best], 3) if auto and best else None
                    t["best_peer"] = best
                    t["best_peer_median"] = ok[best] if best else None
                    t["auto_over_best_peer"] = ratio
                    t["met_peers"] = bool(ratio >= 1.1) if ratio is not None else None
                figures = [f"{m} {v['median']} [{v['min']}-{v['max']}]" for m, v in {**out, **spreads}.items()]
                res.note(f"{scenario}: " + ", ".join(figures))

            rotation = len(modes) + (len(peers) + len(in_rotation) if scenario == "cold" else 0)
            section(scenario, run, need=3 * rotation * pass_s[0] + 10 if not args.smoke else 5)
    except Exception as exc:
        res.error("daemons", exc)
    finally:
        if daemons is not None:
            doc["daemon_logs_tail"] = daemons.close()
        if in_rotation and "raw" not in doc:
            res.skip("raw", "the cold rotation it was to be measured in did not run")
        res.save()

    # -- read shapes on the native engine: read size x readers, cold, one pass each
    def sweep():
        limit = int(args.sweep_gb * GB)
        sizes = [int(x) * KiB for x in args.sweep_sizes_kib.split(",") if x]
        threads = [int(x) for x in args.sweep_threads.split(",") if x]
        out: dict = {}
        for direct in (True, False):
            for size in sizes:
                for t in threads:
                    if budget() < 10:
                        res.note("sweep cut short by the budget")
                        doc["sweep"] = {"bytes_each": min(limit, nbytes), "gbps": out, "cut_short": True}
                        return
                    key = f"{'odirect' if direct else 'buffered'} {size // KiB}KiB x{t}"
                    out[key] = timed(key, lambda: native_read(paths, size, t, direct, bufs["private"], limit))
        doc["sweep"] = {"bytes_each": min(limit, nbytes), "gbps": out}
        best = max(out, key=out.get)
        res.note(f"sweep over {min(limit, nbytes) / GB:.2f} GB: best {best} {out[best]} GB/s")

    section("sweep", sweep, need=15)
    # the huge-page shapes mean something only where the kernel did back their memory with huge pages
    doc["huge_share"] = {m: b.huge_share() for m, b in bufs.items()}
    for b in bufs.values():
        b.close()
    doc["bytes"] = nbytes
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res.note("targets: " + str(targets))
    res.save()
    shutil.rmtree(work, ignore_errors=True)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
