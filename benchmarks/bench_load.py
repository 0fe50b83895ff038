#!/usr/bin/env python3
"""Load benchmarks on a GPU machine: hotweights' cuda backend against the machine's ceilings and its peers.

One run measures, for a Llama-70B-like TP shard (bf16, hidden 8192, intermediate 28672):

- ceilings: pinned host->device copy rate (one GPU, and every GPU at once), and the raw read rate of
  the checkpoint into pinned host memory with no GPU copy (buffered pread from page cache and from
  tmpfs; O_DIRECT and buffered from a cold cache);
- hotweights (CudaBackend called directly: plan_rank + allocate + fill) from page cache, tmpfs
  (/dev/shm) and cold (after ``echo 3 > /proc/sys/vm/drop_caches``), and two ranks on two GPUs;
- peers, each where importable: safetensors.torch.load_file(device=cuda), fastsafetensors (no GDS),
  Run:ai model streamer, InstantTensor;
- attach latency (p50/p99) of a >= 16 GB rank with >= 1,000 tensors from a separate process
  (import fds + map + build tensors, through hotweights.cuda.driver), and through the real daemon
  (hotweights.connect().attach()) when it runs here.

Writes ``bench-<gpu>-<date>.json`` into each ``--out`` folder after every section (a run cut short
still leaves what it measured). Targets: page cache and tmpfs >= 90% of min(pinned H2D, read rate of
the same source) and >= 3.5x the best peer; cold >= 90% of the raw O_DIRECT read rate; two GPUs >= 90%
of the two-GPU ceiling. Rates are GB/s (1e9 bytes).

Notes from the machines (DESIGN.md): the page cache is empty at the start of each command and is
warmed here; fresh guest memory is slow on first touch, so a large region is touched before any
timing; pinned buffers are allocated outside the timed regions.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
for sub in ("client", "daemon"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

T = TypeVar("T")

GB = 1e9
MiB = 1024 * 1024
GiB = 1024 * MiB

# --- results ------------------------------------------------------------------------------------------


def run_section(res, skip, budget, name: str, fn, need: float = 30.0, why_not: str | None = None):
    """One time-boxed section: skipped (with the reason in the JSON) when asked, when ``why_not`` says it
    cannot run here, or when the budget is short; an error is recorded, not raised; results saved after."""
    if why_not:
        res.skip(name, why_not)
        return None
    if name in skip:
        res.skip(name, "--skip")
        return None
    if budget() < need:
        res.skip(name, f"time budget ({budget():.0f}s left, needs ~{need:.0f}s)")
        return None
    try:
        return fn()
    except Exception as exc:
        res.error(name, exc)
        return None
    finally:
        free_torch()
        res.save()


class Results:
    def __init__(self, outs: list[str]) -> None:
        self.doc: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": [], "skipped": {}, "log": []}
        self.outs = [Path(o) for o in outs]
        self.t0 = time.monotonic()
        self.name = None

    def set_name(self, gpu: str) -> None:
        safe = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower()
        self.name = f"bench-{safe}-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def note(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.doc["log"].append(line)

    def error(self, where: str, exc: BaseException) -> None:
        text = f"{where}: {type(exc).__name__}: {exc}"
        self.note("ERROR " + text)
        self.doc["errors"].append(
            {"where": where, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=6)}
        )

    def skip(self, what: str, why: str) -> None:
        self.note(f"skipped {what}: {why}")
        self.doc["skipped"][what] = why

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        name = self.name or f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
        for out in self.outs:
            try:
                out.mkdir(parents=True, exist_ok=True)
                tmp = out / (name + ".tmp")
                tmp.write_text(json.dumps(self.doc, indent=1, default=str))
                tmp.replace(out / name)
            except OSError as exc:
                print(f"cannot write results into {out}: {exc}", flush=True)


def rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / GB, 3) if seconds > 0 else 0.0


def summary(samples: list[float]) -> dict:
    return {
        "median": round(statistics.median(samples), 3),
        "best": round(max(samples), 3),
        "samples": [round(s, 3) for s in samples],
    }


# --- the checkpoint -------------------------------------------------------------------------------------


def llama_shard_layout(target_bytes: float, tp: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of one TP rank of a Llama-70B-like model, as many layers as fit ``target_bytes`` (bf16)."""
    hidden, inter, heads, kv, hd, vocab = 8192, 28672, 64, 8, 128, 128256
    q, kvd, ff, v = heads * hd // tp, max(kv * hd // tp, hd), inter // tp, -(-vocab // tp)
    layer = [
        ("self_attn.q_proj.weight", (q, hidden)),
        ("self_attn.k_proj.weight", (kvd, hidden)),
        ("self_attn.v_proj.weight", (kvd, hidden)),
        ("self_attn.o_proj.weight", (hidden, q)),
        ("mlp.gate_proj.weight", (ff, hidden)),
        ("mlp.up_proj.weight", (ff, hidden)),
        ("mlp.down_proj.weight", (hidden, ff)),
        ("input_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
    ]
    per_layer = sum(2 * math.prod(s) for _, s in layer)
    fixed = [
        ("model.embed_tokens.weight", (v, hidden)),
        ("lm_head.weight", (v, hidden)),
        ("model.norm.weight", (hidden,)),
    ]
    fixed_bytes = sum(2 * math.prod(s) for _, s in fixed)
    layers = max(1, math.ceil((target_bytes - fixed_bytes) / per_layer))
    out = [fixed[0]]
    for i in range(layers):
        out += [(f"model.layers.{i}.{n}", s) for n, s in layer]
    return out + fixed[1:]


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], pool: memoryview, salt: int) -> int:
    """Writes a safetensors file of (name, shape, dtype) with pseudo-random data from ``pool``; returns data bytes."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}
    header, off, sizes = {}, 0, []
    for name, shape, dt in tensors:
        n = math.prod(shape) * size[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        sizes.append(n)
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, struct.pack("<Q", len(raw)) + raw)
        plen = len(pool)
        for i, n in enumerate(sizes):
            start = ((salt * 1_000_003 + i) * 7919 * 4096) % plen
            left = n
            while left:
                k = min(left, plen - start, 64 * MiB)
                view = pool[start : start + k]
                done = 0
                while done < k:
                    done += os.write(fd, view[done:])
                left -= k
                start = (start + k) % plen
    finally:
        os.close(fd)
    return off


def make_checkpoint(root: Path, ranks: int, rank_bytes: float, files: int, tp: int, res: Results) -> dict:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    layout = llama_shard_layout(rank_bytes, tp)
    pool = memoryview(np.random.default_rng(1234).integers(0, 256, 96 * MiB + 4096, dtype=np.uint8).tobytes())
    per = [2 * math.prod(s) for _, s in layout]
    target = sum(per) / files
    parts: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    acc = 0
    for (name, shape), n in zip(layout, per):
        if acc >= target * len(parts) and len(parts) < files:
            parts.append([])
        parts[-1].append((name, shape, "BF16"))
        acc += n
    t0 = time.perf_counter()
    total = 0
    for r in range(ranks):
        for p, tensors in enumerate(parts):
            total += write_safetensors(root / f"model-rank-{r}-part-{p}.safetensors", tensors, pool, salt=r * 100 + p)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    info = {
        "path": str(root),
        "ranks": ranks,
        "files_per_rank": len(parts),
        "tensors_per_rank": len(layout),
        "bytes_per_rank": total // ranks,
        "tp_shape_of": tp,
        "write_s": round(t1 - t0, 1),
        "sync_s": round(t2 - t1, 1),
    }
    res.note(
        f"checkpoint: {ranks} rank(s) x {total / ranks / GB:.2f} GB, {len(layout)} tensors, {len(parts)} files "
        f"per rank, written in {t1 - t0:.1f}s + sync {t2 - t1:.1f}s"
    )
    return info


def rank_files(root: Path, rank: int) -> list[str]:
    return sorted(str(p) for p in root.glob(f"model-rank-{rank}-part-*.safetensors"))


# One decoder layer of a Llama-70B-class model (hidden 8192, 8 KV heads of 128, MLP 28672) with Qwen-style
# q/k/v biases, as rank 0 of 8-way tensor parallelism holds it: name -> shape.
TP8_LAYER = {
    "input_layernorm.weight": (8192,),
    "post_attention_layernorm.weight": (8192,),
    "mlp.gate_proj.weight": (3584, 8192),
    "mlp.up_proj.weight": (3584, 8192),
    "mlp.down_proj.weight": (8192, 3584),
    "self_attn.q_proj.weight": (1024, 8192),
    "self_attn.k_proj.weight": (128, 8192),
    "self_attn.v_proj.weight": (128, 8192),
    "self_attn.o_proj.weight": (8192, 1024),
    "self_attn.q_proj.bias": (1024,),
    "self_attn.k_proj.bias": (128,),
    "self_attn.v_proj.bias": (128,),
}
TP8_OUTER = {"model.embed_tokens.weight": (16032, 8192), "lm_head.weight": (16032, 8192), "model.norm.weight": (8192,)}


def sparse_checkpoint(root: Path, min_bytes: float, min_tensors: int) -> dict:
    """One rank of a TP=8 70B-class layout, with as many layers as it takes to reach both minimums.

    bf16, tensors in name order as safetensors writes them, data left as holes (instant to make): the
    attach benchmark measures the table and the mapping, not the bytes.
    """
    root.mkdir(parents=True, exist_ok=True)
    per_layer = sum(2 * math.prod(s) for s in TP8_LAYER.values())
    outer = sum(2 * math.prod(s) for s in TP8_OUTER.values())
    layers = max(
        math.ceil((min_tensors - len(TP8_OUTER)) / len(TP8_LAYER)), math.ceil((min_bytes - outer) / per_layer), 1
    )
    shapes = dict(TP8_OUTER)
    shapes.update({f"model.layers.{i}.{k}": v for i in range(layers) for k, v in TP8_LAYER.items()})
    header, off = {}, 0
    for name in sorted(shapes):
        n = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = root / "model-rank-0-part-0.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return {
        "path": str(root),
        "bytes": off,
        "tensors": len(header),
        "layers": layers,
        "layout": "70B-class decoder layers with q/k/v biases, rank 0 of TP=8, bf16, name order",
    }


# --- host helpers -----------------------------------------------------------------------------------------


def run_threads(fn: Callable[[T], object], args: Iterable[T]) -> float:
    """Runs ``fn(a)`` for every ``a`` of ``args`` at once, one thread each, and waits for them all.
    Returns the wall seconds from the first thread's start to the last one's end; raises the first
    error a thread raised (after every thread has ended)."""
    errors: list[BaseException] = []

    def run(a: T) -> None:
        try:
            fn(a)
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(a,)) for a in args]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt


def pretouch(nbytes: int, threads: int = 8) -> float:
    """Touches ``nbytes`` of fresh anonymous memory (guest memory is backed lazily), then frees it."""
    import mmap

    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    step = -(-nbytes // threads)

    def touch(i):
        lo = i * step
        n = max(0, min(step, nbytes - lo))
        if n:
            ctypes.memset(base + lo, 1, n)

    run_threads(touch, range(threads))
    gc.collect()  # the ctypes view into the mapping must go before close()
    try:
        m.close()
    except BufferError:
        pass
    return time.perf_counter() - t0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches() -> str | None:
    try:
        drop_caches()
    except OSError as exc:
        return f"cannot drop the page cache: {exc}"
    return None


def raw_read(paths: list[str], ring, direct: bool, chunk: int | None = None) -> tuple[int, float, int]:
    """Reads whole files into the ring's pinned slots with its thread count, ``chunk`` bytes a read (at
    most a slot); no GPU copy. Returns (bytes, seconds, files read buffered because O_DIRECT was refused)."""
    from hotweights.errors import BadCheckpoint
    from hotweightsd.loaders.files import open_source

    chunk = min(chunk or ring.slot_size, ring.slot_size)
    sizes = [os.path.getsize(p) for p in paths]
    work = [(i, off, min(chunk, sizes[i] - off)) for i in range(len(paths)) for off in range(0, sizes[i], chunk)]
    opened = [open_source(p, direct) for p in paths]
    fds = [fd for fd, _ in opened]
    lock = threading.Lock()
    state = {"next": 0}

    def worker(w):
        view = ring.slot(w, 0)[1]
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(work):
                return
            fi, off, n = work[i]
            want = -(-n // 4096) * 4096 if direct else n
            got = 0
            while got < n:
                k = os.preadv(fds[fi], [view[got:want]], off + got)
                if k == 0:
                    raise BadCheckpoint(f"{paths[fi]} ended early")
                got += k

    try:
        dt = run_threads(worker, range(ring.threads))
    finally:
        for fd in fds:
            os.close(fd)
    return sum(sizes), dt, sum(1 for _, d in opened if not d) if direct else 0


def on_each(devices, fn) -> tuple[dict, float]:
    """Runs ``fn(device)`` for every device at once, one thread each; (results by device, wall seconds).
    Raises the first error."""
    out = {}

    def run(d):
        out[d] = fn(d)

    return out, run_threads(run, devices)


def h2d(devices: list[int], size: int = 1 * GiB, reps: int = 8) -> dict:
    """Pinned host -> device copy rate per device, all devices at once. One pinned buffer per device
    (on its NUMA node where the node has several), two streams, ``reps`` copies of ``size`` bytes."""
    from hotweights.cuda import devices as cd
    from hotweightsd.loaders.ring import run_on_cpus

    state = {}
    for d in devices:
        with cd.current(d) as drv:
            _, cpus = cd.numa_cpus(d)

            def alloc(d=d):
                with cd.current(d) as drv2:
                    return int(
                        cd.check(drv2.cuMemHostAlloc(size, int(drv2.CU_MEMHOSTALLOC_PORTABLE)), "cuMemHostAlloc")
                    )

            host = run_on_cpus(cpus, alloc)
            ctypes.memset(host, 7, size)
            dev = int(cd.check(drv.cuMemAlloc(size), "cuMemAlloc"))
            streams = [cd.check(drv.cuStreamCreate(1), "cuStreamCreate") for _ in range(2)]
            state[d] = {"host": host, "dev": dev, "streams": streams}
    barrier = threading.Barrier(len(devices), timeout=120)
    times, errors = {}, []

    def run(d):
        try:
            measure(d)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def measure(d):
        cd.set_current(d)
        drv = cd.init()
        s = state[d]
        piece = 256 * MiB

        def copy_all():
            for k in range(0, size, piece):
                cd.check(
                    drv.cuMemcpyHtoDAsync(
                        s["dev"] + k, s["host"] + k, min(piece, size - k), s["streams"][(k // piece) % 2]
                    ),
                    "cuMemcpyHtoDAsync",
                )

        copy_all()
        for st in s["streams"]:
            cd.check(drv.cuStreamSynchronize(st), "cuStreamSynchronize")
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(reps):
            copy_all()
        for st in s["streams"]:
            cd.check(drv.cuStreamSynchronize(st), "cuStreamSynchronize")
        times[d] = (t0, time.perf_counter())

    ts = [threading.Thread(target=run, args=(d,)) for d in devices]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for d in devices:
        with cd.current(d) as drv:
            s = state[d]
            for st in s["streams"]:
                drv.cuStreamDestroy(st)
            drv.cuMemFree(s["dev"])
            drv.cuMemFreeHost(s["host"])
    if errors:
        raise errors[0]
    per = {d: rate(size * reps, t1 - t0) for d, (t0, t1) in times.items()}
    wall = max(t1 for _, t1 in times.values()) - min(t0 for t0, _ in times.values())
    return {"per_device": per, "aggregate": rate(size * reps * len(devices), wall), "bytes_each": size * reps}


# --- hotweights ---------------------------------------------------------------------------------------------


def hw_load(backend, ckpt: Path, rank: int, device: int, keep: bool = False) -> dict:
    import threading as th

    from hotweights.format.checkpoint import open_checkpoint
    from hotweightsd.core.backend import AllocationMode
    from hotweightsd.core.layout import plan_rank

    t0 = time.perf_counter()
    rf = open_checkpoint(ckpt).ranks[rank]
    layout = plan_rank(rf, backend.granularity(device), backend.max_allocation())
    allocs = []
    try:
        for s in layout.allocation_sizes:
            allocs.append(backend.allocate(device, s, AllocationMode.FD))
        t1 = time.perf_counter()
        desc = backend.fill(layout, allocs, lambda n: None, th.Event())
        t2 = time.perf_counter()
    except BaseException:
        for a in allocs:
            a.close()
        raise
    out = {
        "bytes": layout.nbytes,
        "tensors": len(layout.placements),
        "seconds": round(t2 - t0, 4),
        "fill_seconds": round(t2 - t1, 4),
        "gbps": rate(layout.nbytes, t2 - t0),
        "fill_gbps": rate(layout.nbytes, t2 - t1),
        "description": desc,
    }
    if keep:
        out["_layout"], out["_allocs"] = layout, allocs
    else:
        for a in allocs:
            a.close()
    return out


def spot_check(layout, allocs, samples: int = 24) -> int:
    """Compares sampled tensors on the device with the file bytes; returns how many matched (raises on a mismatch)."""
    import random

    from hotweights.cuda import devices as cd

    picks = (
        layout.placements[:2]
        + layout.placements[-2:]
        + random.Random(0).sample(layout.placements, min(samples, len(layout.placements)))
    )
    for p in picks:
        a = allocs[p.allocation]
        n = min(p.nbytes, 4 * MiB)
        buf = ctypes.create_string_buffer(max(n, 1))
        with cd.current(a.device) as drv:
            cd.check(drv.cuMemcpyDtoH(ctypes.addressof(buf), a.address + p.offset, n), "cuMemcpyDtoH")
        with open(layout.files[p.file], "rb") as f:
            f.seek(p.file_offset)
            if f.read(n) != buf.raw[:n]:
                raise AssertionError(f"hotweights loaded {p.name} wrong")
    return len(picks)


def hw_series(backend, ckpt: Path, reps: int, res: Results, label: str) -> dict:
    runs = [hw_load(backend, ckpt, 0, 0) for _ in range(reps)]
    out = {
        "gbps": summary([r["gbps"] for r in runs]),
        "fill_gbps": summary([r["fill_gbps"] for r in runs]),
        "bytes": runs[0]["bytes"],
        "description": runs[0]["description"],
    }
    res.note(f"hotweights {label}: {out['gbps']['median']} GB/s median of {reps} ({out['description']})")
    return out


# --- peers --------------------------------------------------------------------------------------------------

PEERS = ("safetensors", "fastsafetensors", "runai", "instanttensor")
PEER_MODULES = {
    "safetensors": "safetensors",
    "fastsafetensors": "fastsafetensors",
    "runai": "runai_model_streamer",
    "instanttensor": "instanttensor",
}
PEER_DISTS = {
    "safetensors": "safetensors",
    "fastsafetensors": "fastsafetensors",
    "runai": "runai-model-streamer",
    "instanttensor": "instanttensor",
}


def peer_available(name: str) -> str | None:
    """None when importable, else why not."""
    try:
        importlib.import_module(PEER_MODULES[name])
    except Exception as exc:
        return f"not installed ({type(exc).__name__}: {exc})"
    return None


def load_peer(name: str, files: list[str], device: int) -> int:
    """Loads every tensor of ``files`` onto cuda:device with a peer; returns tensor bytes. Synchronizes."""
    import torch

    dev = f"cuda:{device}"
    out: dict = {}
    if name == "safetensors":
        from safetensors.torch import load_file

        for f in files:
            out.update(load_file(f, device=dev))
    elif name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), dev, nogds=True)
        try:
            loader.add_filenames({0: files})
            fb = loader.copy_files_to_device()
            try:
                for k in loader.get_keys():
                    out[k] = fb.get_tensor(k)
                torch.cuda.synchronize(device)
            finally:
                fb.close()
        finally:
            loader.close()
    elif name == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for k, t in s.get_tensors():
                out[k] = t.to(dev)
    elif name == "instanttensor":
        from instanttensor import safe_open

        with safe_open(list(files), framework="pt", device=device) as f:
            for k, t in f.tensors():
                out[k] = t
    else:
        raise ValueError(name)
    torch.cuda.synchronize(device)
    n = sum(t.numel() * t.element_size() for t in out.values())
    del out
    return n


def boot_id() -> str | None:
    """This boot's id: tells two runs on one machine from runs on two (None where /proc does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def free_torch() -> None:
    gc.collect()
    try:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:
        pass


def run_peers(files: list[str], peers: list[str], res: Results, label: str, cold: bool = False, budget=None) -> dict:
    out = {}
    for name in peers:
        why = peer_available(name)
        if why:
            out[name] = {"status": why}
            continue
        if budget is not None and budget() < 20:
            out[name] = {"status": "skipped: time budget"}
            continue
        try:
            if cold:
                drop_caches()
            t0 = time.perf_counter()
            n = load_peer(name, files, 0)
            dt = time.perf_counter() - t0
            out[name] = {"status": "ok", "seconds": round(dt, 3), "bytes": n, "gbps": rate(n, dt)}
            res.note(f"{name} {label}: {rate(n, dt)} GB/s ({dt:.2f}s)")
        except Exception as exc:
            res.error(f"{name} {label}", exc)
            out[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
        finally:
            free_torch()
    return out


def best_peer(peers: dict) -> tuple[str | None, float]:
    ok = [(v["gbps"], k) for k, v in peers.items() if v.get("status") == "ok"]
    if not ok:
        return None, 0.0
    g, k = max(ok)
    return k, g


def cuda_backend(reserve: int = 512 * MiB, devices=(), **loader):
    """A CudaBackend with GDS off and the given LoaderSettings fields (``None`` ones at their defaults),
    its pinned rings made for ``devices`` before anything is timed."""
    from hotweightsd.backends.cuda import CudaBackend
    from hotweightsd.loaders.settings import LoaderSettings

    loader.setdefault("gds", "off")
    b = CudaBackend(reserve=reserve, loader=LoaderSettings(**{k: v for k, v in loader.items() if v is not None}))
    try:
        for d in devices:
            b.ring(d)
    except BaseException:
        b.close()
        raise
    return b


def load_at_once(backend, ckpt: Path, devices) -> tuple[dict, float]:
    """Rank d onto device d for every device at once, announced as one batch as the daemon announces a
    model's ranks; (hw_load results by device, wall seconds)."""
    devices = list(devices)
    with backend.concurrent_fills(devices):
        return on_each(devices, lambda d: hw_load(backend, ckpt, d, d))


# --- attach latency ---------------------------------------------------------------------------------------------

ATTACH_CLIENT = r"""
import gc, json, os, sys, time
import torch
spec = json.loads(sys.stdin.read())
from hotweights.mapping.regions import open_region

from hotweights.mapping.table import Table, TensorMeta, build_tensors
table = Table.from_rows(TensorMeta(p["name"], "BF16", p["served_dtype"], tuple(p["shape"]), p["allocation"],
                                   p["offset"], p["nbytes"]) for p in spec["placements"])
builder = "hotweights.mapping.table.build_tensors"

def build_all(bases):
    return build_tensors(table, bases)

dev = spec["regions"][0]["device"]
t0 = time.perf_counter()
torch.zeros(1, device=f"cuda:{dev}")
ctx_s = time.perf_counter() - t0

def attach_once():
    t0 = time.perf_counter()
    regions = [open_region(r["handle_type"], r["size"], r["device"], r["fd"]) for r in spec["regions"]]
    tensors = build_all([rg.base for rg in regions])
    t1 = time.perf_counter()
    assert len(tensors) == len(spec["placements"])
    for rg in regions:
        rg.close()
    del tensors, regions  # the last references: the mappings are undone here (no cycles, no gc needed)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1

first = attach_once()
lat, rel = [], []
for _ in range(spec["reps"]):
    a, r = attach_once()
    lat.append(a)
    rel.append(r)
print(json.dumps({"context_s": ctx_s, "first_s": first[0], "attach_s": lat, "release_s": rel, "builder": builder}),
      flush=True)
"""

DAEMON_CLIENT = r"""
import json, sys, time
import torch, hotweights
spec = json.loads(sys.stdin.read())
c = hotweights.connect(spec["socket"])
torch.zeros(1, device="cuda:0")
lat, rel, parts = [], [], []
for i in range(spec["reps"] + 1):
    t0 = time.perf_counter()
    a = c.attach(spec["name"], rank=0)
    n = len(a)
    t1 = time.perf_counter()
    timings = getattr(a, "timings", {})
    a.release()
    t2 = time.perf_counter()
    if i:
        lat.append(t1 - t0)
        rel.append(t2 - t1)
        parts.append(timings)
print(json.dumps({"tensors": n, "attach_s": lat, "release_s": rel, "parts": parts}), flush=True)
"""


def percentiles(xs: list[float]) -> dict:
    s = sorted(xs)

    def pct(q):
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    return {
        "p50_ms": round(pct(0.50) * 1e3, 3),
        "p99_ms": round(pct(0.99) * 1e3, 3),
        "min_ms": round(s[0] * 1e3, 3),
        "max_ms": round(s[-1] * 1e3, 3),
        "n": len(s),
    }


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "client"), str(ROOT / "daemon")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def attach_latency(backend, ckpt: Path, reps: int, res: Results) -> dict:
    loaded = hw_load(backend, ckpt, 0, 0, keep=True)
    layout, allocs = loaded.pop("_layout"), loaded.pop("_allocs")
    fds = [a.export_fd() for a in allocs]
    try:
        spec = {
            "reps": reps,
            "regions": [
                {"handle_type": a.handle_type.value, "size": a.size, "device": a.device, "fd": fd}
                for a, fd in zip(allocs, fds)
            ],
            "placements": [
                {
                    "name": p.name,
                    "served_dtype": p.served_dtype,
                    "shape": list(p.shape),
                    "allocation": p.allocation,
                    "offset": p.offset,
                    "nbytes": p.nbytes,
                }
                for p in layout.placements
            ],
        }
        r = subprocess.run(
            [sys.executable, "-c", ATTACH_CLIENT],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=240,
            pass_fds=tuple(fds),
            env=child_env(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"attach client failed ({r.returncode}): {r.stderr[-2000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        for fd in fds:
            os.close(fd)
        for a in allocs:
            a.close()
    out = {
        "rank_bytes": layout.nbytes,
        "tensors": len(layout.placements),
        "allocations": len(allocs),
        "load_gbps": loaded["gbps"],
        "load_description": loaded["description"],
        "tensor_builder": got.get("builder"),
        "context_init_s": round(got["context_s"], 3),
        "first_attach_ms": round(got["first_s"] * 1e3, 3),
        "attach": percentiles(got["attach_s"]),
        "release": percentiles(got["release_s"]),
    }
    res.note(
        f"attach {layout.nbytes / GB:.1f} GB, {len(layout.placements)} tensors: p50 {out['attach']['p50_ms']} ms, "
        f"p99 {out['attach']['p99_ms']} ms (cuda_import, separate process)"
    )
    return out


# --- the real daemon (best effort) ---------------------------------------------------------------------------


def daemon_section(ckpt: Path, attach_ckpt: Path | None, reps: int, res: Results, budget) -> dict:
    import hotweights
    from hotweights.testing import Daemon

    if not hasattr(hotweights, "connect"):
        return {"status": "no hotweights.connect in this tree"}
    sockdir = tempfile.mkdtemp(prefix="hwb-", dir="/tmp")
    sock = os.path.join(sockdir, "hw.sock")
    out: dict = {}
    daemon = None
    try:
        daemon = Daemon.start(sock, backend="cuda", log=os.path.join(sockdir, "daemon.log"), env=child_env())
        client = daemon.connect()
        files = sorted(str(p) for p in ckpt.glob("*.safetensors"))
        warm(files)
        t0 = time.perf_counter()
        info = client.load("bench", str(ckpt))
        dt = time.perf_counter() - t0
        nbytes = sum(os.path.getsize(f) for f in files)
        out["load"] = {"seconds": round(dt, 3), "gbps_of_file_bytes": rate(nbytes, dt), "info": str(info)[:2000]}
        res.note(f"daemon load from page cache: {rate(nbytes, dt)} GB/s ({dt:.2f}s)")
        client.unload("bench", force=True)
        if attach_ckpt is not None and budget() > 60:
            client.load("attach", str(attach_ckpt))
            r = subprocess.run(
                [sys.executable, "-c", DAEMON_CLIENT],
                capture_output=True,
                text=True,
                timeout=240,
                input=json.dumps({"socket": sock, "name": "attach", "reps": reps}),
                env=child_env(),
            )
            if r.returncode != 0:
                raise RuntimeError(f"daemon attach client failed: {r.stderr[-2000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            out["attach"] = {
                "tensors": got["tensors"],
                "attach": percentiles(got["attach_s"]),
                "release": percentiles(got["release_s"]),
                "parts_p50_ms": {
                    k: percentiles([p[k] for p in got["parts"]])["p50_ms"]
                    for k in (got["parts"][0] if got["parts"] else {})
                },
            }
            res.note(
                f"daemon attach: p50 {out['attach']['attach']['p50_ms']} ms, p99 {out['attach']['attach']['p99_ms']} ms"
            )
            client.unload("attach", force=True)
        out["status"] = "ok"
        client.close()
    except Exception as exc:
        res.error("daemon", exc)
        out["status"] = f"failed: {type(exc).__name__}: {exc}"
    finally:
        if daemon is not None:
            daemon.stop(timeout=20)
        try:
            out["daemon_log_tail"] = Path(sockdir, "daemon.log").read_text(errors="replace")[-3000:]
        except OSError:
            pass
        shutil.rmtree(sockdir, ignore_errors=True)
    return out


def warm(paths: list[str]) -> None:
    """Brings files into the page cache (untimed)."""
    buf = bytearray(16 * MiB)
    for f in paths:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# --- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", action="append", default=None, help="folder for the JSON (repeatable); default benchmarks/results"
    )
    ap.add_argument("--workdir", default="/tmp/hw-bench", help="where the checkpoints are written (a disk, not tmpfs)")
    ap.add_argument("--rank-gb", type=float, default=8.5, help="bytes per rank (GB) of the main checkpoint")
    ap.add_argument("--files", type=int, default=4, help="files per rank")
    ap.add_argument("--tp", type=int, default=8, help="the TP degree whose per-rank shapes are used")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: min(2, visible))")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of warm hotweights loads and raw reads")
    ap.add_argument("--attach-gb", type=float, default=16.5)
    ap.add_argument("--attach-tensors", type=int, default=1200)
    ap.add_argument("--attach-reps", type=int, default=30)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--cold-peers", default=",".join(PEERS), help="peers measured cold too ('' for none)")
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of: tmpfs, cold, attach, daemon, two-gpu, sweep, peers, "
        "python-engine (the python workers measured beside the native engine)",
    )
    ap.add_argument("--pretouch-gb", type=float, default=24.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunk-mb", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--read-mode", default="auto", help="auto (the daemon's default) | pread | odirect")
    ap.add_argument(
        "--cold-threads",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[4, 8],
        help="reader counts the native loop is also measured with, cold (O_DIRECT)",
    )
    ap.add_argument("--engine", default=None, help="auto | native | python (default: the loader's own choice)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--h2d-mb", type=int, default=1024, help="pinned buffer per GPU for the H2D ceiling")
    args = ap.parse_args()

    res = Results(args.out or [str(ROOT / "benchmarks" / "results")])
    deadline = time.monotonic() + args.budget
    budget = lambda: deadline - time.monotonic()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    peers = [] if "peers" in skip else [p for p in args.peers.split(",") if p]
    cold_peers = [p for p in args.cold_peers.split(",") if p and p in peers]
    doc = res.doc
    doc["args"] = vars(args)

    import torch

    from hotweights.cuda import devices as cd
    from hotweightsd.loaders import native

    ngpu = cd.device_count()
    if ngpu == 0:
        res.note(f"no GPU: {cd.unavailable_reason()}")
        doc["fatal"] = f"no GPU: {cd.unavailable_reason()}"
        res.save()
        return 2
    gpus = min(ngpu, args.gpus or 2)
    names = [cd.device_name(d) for d in range(ngpu)]
    res.set_name(names[0])
    doc["machine"] = {
        "gpus": names,
        "gpu_total_bytes": [cd.device_total(d) for d in range(ngpu)],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_bindings": _version("cuda-bindings"),
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "numa_nodes": cd.numa_nodes(),
        "nvidia_fs": bool(list(Path("/dev").glob("nvidia-fs*"))),
    }
    doc["peers_versions"] = {p: _version(PEER_DISTS[p]) for p in PEERS}
    res.note(f"{ngpu} GPU(s): {names}; using {gpus}")
    res.save()

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "ckpt"
    # -- setup: pre-touch host memory while the checkpoint is written
    touch = threading.Thread(
        target=lambda: doc.setdefault("pretouch_s", round(pretouch(int(args.pretouch_gb * GB)), 1))
    )
    touch.start()
    try:
        doc["checkpoint"] = make_checkpoint(ckpt, gpus, args.rank_gb * GB, args.files, args.tp, res)
    except Exception as exc:
        res.error("checkpoint", exc)
        res.save()
        return 1
    touch.join()
    res.note(f"pre-touched {args.pretouch_gb} GB in {doc.get('pretouch_s')}s")
    files0 = rank_files(ckpt, 0)

    def hw_backend(devices=(0,), **override):
        """A backend with the run's loader settings (``--threads``, ``--chunk-mb``, ...), some overridden."""
        kw = dict(
            threads=args.threads,
            chunk_size=(args.chunk_mb or 0) * MiB or None,
            ring_depth=args.depth,
            read_mode=args.read_mode,
            engine=args.engine,
        )
        return cuda_backend(devices=devices, **{**kw, **override})

    backend = hw_backend(devices=range(gpus))
    engine = backend.path.engine
    doc["engine"] = {
        "used": engine,
        "why": backend.path.engine_why or "native engine",
        "native": native.unavailable_reason() or "built",
    }
    doc["hotweights_settings"] = backend.path.describe()
    # The python workers, measured beside the native engine in the same run (what the engine is worth).
    py_backend = None
    if engine == "native" and "python-engine" not in skip:
        py_backend = hw_backend(devices=range(gpus), engine="python")
    doc["gds_note"] = backend.note
    ring0 = backend.ring(0)

    # -- ceilings
    try:
        size = args.h2d_mb * MiB
        doc["h2d"] = {"one_gpu": h2d([0], size)}
        if gpus > 1:
            doc["h2d"]["all_gpus"] = h2d(list(range(gpus)), size)
        res.note(f"pinned H2D: {doc['h2d']}")
    except Exception as exc:
        res.error("h2d", exc)
    res.save()

    targets = doc.setdefault("targets", {})

    def section(name: str, fn, need: float = 30.0):
        return run_section(res, skip, budget, name, fn, need)

    # -- page cache
    def warm_source(key: str, label: str, where: Path) -> dict:
        """Raw read rate, hotweights (verified once) and the peers, from files already in memory."""
        files = rank_files(where, 0)
        raw_read(files, ring0, direct=False)  # brings them into the page cache (a no-op on tmpfs)
        # The read ceiling is the better of two read sizes (docs/loader.md: chunk_size).
        by_size = {}
        for chunk in (4 * MiB, 16 * MiB):
            reads = [raw_read(files, ring0, direct=False, chunk=chunk) for _ in range(args.reps)]
            by_size[f"{ring0.threads} threads x {chunk // MiB}MiB"] = summary([rate(n, dt) for n, dt, _ in reads])
        read = dict(max(by_size.values(), key=lambda v: v["median"]), by_read_size=by_size)
        res.note(f"{label} -> pinned (no GPU): {read['median']} GB/s ({by_size})")
        loaded = hw_load(backend, where, 0, 0, keep=True)
        verified = spot_check(loaded.pop("_layout"), loaded["_allocs"])
        for a in loaded.pop("_allocs"):
            a.close()
        hw = hw_series(backend, where, args.reps, res, label)
        hw["verified_tensors"] = verified
        out = {"raw_read_pinned": read, "hotweights": hw}
        if py_backend is not None:
            out["hotweights_python_engine"] = hw_series(py_backend, where, args.reps, res, f"{label} (python workers)")
        out["peers"] = run_peers(files, peers, res, label, budget=budget)
        doc[key] = out
        _target(targets, key, hw["gbps"]["median"], read["median"], doc.get("h2d"), out["peers"])
        return out

    def page_cache():
        return warm_source("page_cache", "page cache", ckpt)

    section("page_cache", page_cache, need=30)

    # -- two GPUs
    def two_gpu():
        rings = [backend.ring(d) for d in range(2)]
        for d in range(2):
            raw_read(rank_files(ckpt, d), rings[d], direct=False)  # warms the page cache
        by_size = {}
        for chunk in (4 * MiB, 16 * MiB):
            results, dt = on_each(
                range(2), lambda d: raw_read(rank_files(ckpt, d), rings[d], direct=False, chunk=chunk)
            )
            by_size[f"{rings[0].threads} threads x {chunk // MiB}MiB per GPU"] = rate(
                sum(n for n, _, _ in results.values()), dt
            )
        read_agg = max(by_size.values())
        samples = []
        desc = {}
        for _ in range(args.reps):
            loads, dt = load_at_once(backend, ckpt, range(2))
            samples.append(rate(sum(v["bytes"] for v in loads.values()), dt))
            desc = {d: v["description"] for d, v in loads.items()}
        py_samples = []
        for _ in range(args.reps if py_backend is not None else 0):
            loads, dt = load_at_once(py_backend, ckpt, range(2))
            py_samples.append(rate(sum(v["bytes"] for v in loads.values()), dt))
        out = {
            "raw_read_pinned_both": read_agg,
            "raw_read_by_read_size": by_size,
            "hotweights_both": summary(samples),
            "descriptions": desc,
            "hotweights_python_engine_both": summary(py_samples) if py_samples else None,
            "h2d_both": doc.get("h2d", {}).get("all_gpus"),
            "h2d_one": doc.get("h2d", {}).get("one_gpu"),
        }
        ceiling = min(read_agg, (doc.get("h2d", {}).get("all_gpus") or {}).get("aggregate", float("inf")))
        got = out["hotweights_both"]["median"]
        targets["two_gpu"] = {
            "hotweights": got,
            "ceiling": ceiling,
            "ratio": round(got / ceiling, 3) if ceiling else None,
            "met": bool(ceiling and got >= 0.9 * ceiling),
        }
        res.note(f"two GPUs: hotweights {got} GB/s aggregate, ceiling {ceiling} GB/s")
        doc["two_gpu"] = out
        return out

    if gpus >= 2:
        section("two-gpu", two_gpu, need=30)
    else:
        res.skip("two-gpu", "one GPU visible")

    # -- a settings sweep from page cache (helps pick defaults)
    def sweep():
        out = {}
        for mode, threads, chunk, depth in (
            ("pread", 16, 16, 2),
            ("pread", 12, 4, 2),
            ("pread", 16, 8, 2),
            ("pread", 16, 4, 4),
        ):
            if budget() < 200:
                break
            key = f"{mode} {threads}x{depth}x{chunk}MiB"
            try:
                b = cuda_backend(devices=[0], threads=threads, chunk_size=chunk * MiB, ring_depth=depth, read_mode=mode)
            except Exception as exc:
                res.error(f"sweep {key}", exc)
                continue
            try:
                out[key] = hw_load(b, ckpt, 0, 0)["gbps"]
                res.note(f"sweep {key}: {out[key]} GB/s")
            except Exception as exc:
                res.error(f"sweep {key}", exc)
            finally:
                b.close()
        doc["sweep_page_cache"] = out
        return out

    section("sweep", sweep, need=200)

    # -- tmpfs
    def tmpfs():
        shm = Path("/dev/shm/hw-bench")
        need = sum(os.path.getsize(f) for f in files0)
        if shutil.disk_usage("/dev/shm").free < need * 1.1:
            res.skip(
                "tmpfs", f"/dev/shm has {shutil.disk_usage('/dev/shm').free / GB:.1f} GB free, needs {need / GB:.1f}"
            )
            return None
        shutil.rmtree(shm, ignore_errors=True)
        shm.mkdir(parents=True)
        try:
            for f in files0:
                shutil.copyfile(f, shm / Path(f).name)
            return warm_source("tmpfs", "tmpfs", shm)
        finally:
            shutil.rmtree(shm, ignore_errors=True)

    section("tmpfs", tmpfs, need=40)

    # -- cold
    def cold():
        why = can_drop_caches()
        if why:
            res.skip("cold", why)
            return None
        nbytes = sum(os.path.getsize(f) for f in files0)
        out = {}
        drop_caches()
        n, dt, fb = raw_read(files0, ring0, direct=True)
        out["raw_read_odirect"] = {"gbps": rate(n, dt), "seconds": round(dt, 2), "buffered_fallback_files": fb}
        res.note(f"cold O_DIRECT -> pinned (no GPU): {rate(n, dt)} GB/s")
        est = nbytes / max(n / dt, 1)  # seconds per cold pass
        drop_caches()
        n, dt, _ = raw_read(files0, ring0, direct=False)
        out["raw_read_buffered"] = {"gbps": rate(n, dt), "seconds": round(dt, 2)}
        res.note(f"cold buffered pread -> pinned (no GPU): {rate(n, dt)} GB/s")
        od = hw_backend(read_mode="odirect", engine=None)
        try:
            drop_caches()
            r = hw_load(od, ckpt, 0, 0)
            out["hotweights_odirect"] = r
            res.note(f"hotweights cold (odirect): {r['gbps']} GB/s")
        finally:
            od.close()
        # The default above runs O_DIRECT on the native loop where it is built; beside it, the python workers,
        # and the native loop with fewer readers (how deep a queue the device likes).
        variants: dict[str, dict] = {"python": dict(engine="python")}
        if native.unavailable_reason() is None:
            variants.update({f"native {t} threads": dict(threads=t, engine="native") for t in args.cold_threads})
        for label, kw in variants.items():
            if budget() < 2 * est + 40:
                break
            b = hw_backend(**{"read_mode": "odirect", "engine": None, **kw})
            try:
                drop_caches()
                r = hw_load(b, ckpt, 0, 0)
                out.setdefault("hotweights_odirect_variants", {})[label] = r
                res.note(f"hotweights cold (odirect, {label}): {r['gbps']} GB/s")
            finally:
                b.close()
        if budget() > est + 20:
            drop_caches()
            r = hw_load(backend, ckpt, 0, 0)
            out["hotweights_default"] = r
            res.note(f"hotweights cold (default mode): {r['gbps']} GB/s ({r['description']})")
        out["peers"] = run_peers(
            files0,
            [p for p in cold_peers if budget() > est + 20],
            res,
            "cold",
            cold=True,
            budget=lambda: budget() - est,
        )
        doc["cold"] = out
        got = max(out.get("hotweights_odirect", {}).get("gbps", 0), out.get("hotweights_default", {}).get("gbps", 0))
        ref = out["raw_read_odirect"]["gbps"]
        targets["cold"] = {
            "hotweights": got,
            "raw_odirect": ref,
            "ratio": round(got / ref, 3) if ref else None,
            "met": bool(ref and got >= 0.9 * ref),
        }
        return out

    section("cold", cold, need=60)

    # -- attach latency
    attach_ckpt = work / "attach"

    def attach():
        info = sparse_checkpoint(attach_ckpt, args.attach_gb * GB, args.attach_tensors)
        b = cuda_backend(read_mode="odirect")
        try:
            out = attach_latency(b, attach_ckpt, args.attach_reps, res)
        finally:
            b.close()
        out["checkpoint"] = info
        doc["attach"] = out
        return out

    section("attach", attach, need=60)
    backend.close()
    if py_backend is not None:
        py_backend.close()
    free_torch()

    # -- the real daemon
    def daemon():
        out = daemon_section(ckpt, attach_ckpt if attach_ckpt.exists() else None, args.attach_reps, res, budget)
        doc["daemon"] = out
        return out

    section("daemon", daemon, need=60)

    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res.note("targets: " + json.dumps(targets))
    res.save()
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _target(targets: dict, where: str, got: float, read: float, h2d: dict | None, peers: dict) -> None:
    h = (h2d or {}).get("one_gpu", {}).get("aggregate", float("inf"))
    ceiling = min(read, h)
    name, best = best_peer(peers)
    targets[where] = {
        "hotweights": got,
        "ceiling": ceiling,
        "ratio_to_ceiling": round(got / ceiling, 3) if ceiling else None,
        "best_peer": name,
        "best_peer_gbps": best,
        "x_best_peer": round(got / best, 2) if best else None,
        "met_ceiling": bool(ceiling and got >= 0.9 * ceiling),
        "met_peers": bool(best and got >= 3.5 * best) if best else None,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
