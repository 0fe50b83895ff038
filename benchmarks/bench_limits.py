#!/usr/bin/env python3
"""Limits benchmark: what oversized requests cost a real daemon (cpu backend), with health probed throughout.

Phases, each against the same daemon, while a prober thread sends a gRPC health Check every 50 ms:

- field: LoadModel with a 64 MiB path (gRPC refuses it over the 1 MiB request limit): status, time to
  the refusal, daemon RSS before and after, peak RSS during;
- header: a file of a million 1-byte tensors (a ~60 MB header): time to the refusal and peak RSS; then a
  file at the per-file limit (100,000 tensors), which loads: time, resident and reserved bytes;
- watchers: 10,000 Watch streams from one client process (grpc.aio): daemon memory per watcher, SetAlias
  latency with them open, time until every watcher has each event;
- models: 1,000 models loaded one after another (a small checkpoint each): load time of the first and
  last 50, ListModels and Status time at 1,000, state file writes seen against events.

Health: per phase, the median, p99 and max of the probe's answer time and how many took over 1 s.
Results: benchmarks/results/bench-limits-<host>-<stamp>.json, with the machine's load average.
``--quick`` runs every phase with small counts (a check of the plumbing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT / "client", ROOT / "daemon"):
    sys.path.insert(0, str(p))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from hotweights.testing import child_env, start_daemon  # noqa: E402
from hotweights.wire.pb import pb, pb_grpc  # noqa: E402

MiB = 2**20

# The watchers' process: opens N Watch streams over a few connections, reads every event, and prints a
# JSON line at each tenth of the streams open and one for each event all N received.
WATCHERS = r"""
import asyncio, json, sys, time
import grpc
from hotweights.wire.pb import pb, pb_grpc

socket, n, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    channels = [grpc.aio.insecure_channel(f"unix://{socket}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(conns)]
    counts = {}
    opened = unsubscribed = 0

    def progress():
        if opened % max(1, n // 10) == 0 or opened + unsubscribed == n:
            print(json.dumps({"opened": opened, "unsubscribed": unsubscribed, "t": time.time()}), flush=True)

    async def watch(i):
        nonlocal opened, unsubscribed
        call = pb_grpc.HotweightsStub(channels[i % conns]).Watch(pb.WatchRequest(ref=""))
        try:
            await call.initial_metadata()  # sent once the daemon has subscribed this stream
            if call.done():  # a status alone (a call refused or cancelled) also ends initial_metadata()
                unsubscribed += 1
                code = await call.code()
                print(json.dumps({"ended": code.name, "details": (await call.details() or "")[:200]}), flush=True)
                progress()
                return
            opened += 1
            progress()
            async for ev in call:
                c = counts[ev.seq] = counts.get(ev.seq, 0) + 1
                if c == n:
                    print(json.dumps({"seq": ev.seq, "alias": ev.alias, "t": time.time()}), flush=True)
                    del counts[ev.seq]
        except grpc.aio.AioRpcError as exc:
            print(json.dumps({"ended": exc.code().name, "details": exc.details()[:200]}), flush=True)

    tasks = [asyncio.ensure_future(watch(i)) for i in range(n)]
    print(json.dumps({"started": n}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    print(json.dumps({"open_at_end": opened, "events_not_everywhere": {s: c for s, c in counts.items()}}), flush=True)
    for t in tasks:
        t.cancel()

asyncio.run(main())
"""


def rss(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"rss": out.get("VmRSS", 0), "hwm": out.get("VmHWM", 0)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Prober(threading.Thread):
    """A health Check every ``interval`` seconds; answer times per phase, and the daemon's RSS each time."""

    def __init__(self, socket: str, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="health-prober")
        self.socket, self.pid, self.interval = socket, pid, interval
        self.phase = "start"
        self.samples: dict[str, list[float]] = {}
        self.failures: dict[str, list[str]] = {}
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        channel = grpc.insecure_channel(f"unix://{self.socket}")
        stub = health_pb2_grpc.HealthStub(channel)
        while not self.stop.is_set():
            phase = self.phase
            t0 = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                self.samples.setdefault(phase, []).append(time.perf_counter() - t0)
            except grpc.RpcError as exc:
                self.failures.setdefault(phase, []).append(f"{exc.code().name} after {time.perf_counter() - t0:.2f}s")
            try:
                self.peak[phase] = max(self.peak.get(phase, 0), rss(self.pid)["rss"])
            except OSError:
                pass
            self.stop.wait(self.interval)
        channel.close()

    def summary(self) -> dict:
        out = {}
        for phase in sorted(set(self.samples) | set(self.failures)):
            xs = self.samples.get(phase, [])
            out[phase] = {
                "probes": len(xs),
                "median_ms": round(statistics.median(xs) * 1e3, 2) if xs else None,
                "p99_ms": round(pct(xs, 0.99) * 1e3, 2) if xs else None,
                "max_ms": round(max(xs) * 1e3, 2) if xs else None,
                "over_1s": sum(x > 1.0 for x in xs),
                "failed": self.failures.get(phase, []),
                "peak_rss_bytes": self.peak.get(phase),
            }
        return out


def tiny_header_file(path: Path, n: int) -> Path:
    """A safetensors file of ``n`` 1-byte U8 tensors."""
    body = b"".join(
        b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]},' % (i, i, i + 1) for i in range(n)
    ).rstrip(b",")
    header = b"{" + body + b"}"
    header += b" " * (-(8 + len(header)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(bytes(n))
    return path


def small_model(path: Path) -> Path:
    """A checkpoint of 8 tensors (a few KiB), as a small model's shard."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({f"layer{i}.weight": torch.randn(16, 32, generator=g) for i in range(8)}, str(path))
    return path


def load_call(stub, name: str, path: str, version: str, timeout: float = 600.0) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        for _ in stub.LoadModel(pb.LoadModelRequest(name=name, path=path, version=version, wait=True), timeout=timeout):
            pass
        return time.perf_counter() - t0, "OK"
    except grpc.RpcError as exc:
        return time.perf_counter() - t0, f"{exc.code().name}: {(exc.details() or '')[:200]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts: a check of the plumbing")
    ap.add_argument("--watchers", type=int, default=10_000)
    ap.add_argument("--models", type=int, default=1_000)
    ap.add_argument("--tensors", type=int, default=1_000_000)
    ap.add_argument("--field-mib", type=int, default=64)
    ap.add_argument("--alias-moves", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.quick:
        args.watchers, args.models, args.tensors, args.alias_moves = 200, 40, 200_000, 5

    host = platform.node() or "host"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc: dict = {
        "benchmark": "bench_limits",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args),
        "machine": {
            "host": host,
            "cpus": os.cpu_count(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "errors": [],
        "log": [],
    }
    t_start = time.monotonic()
    out = Path(args.out) / f"bench-limits-{''.join(c if c.isalnum() else '-' for c in host)}-{stamp}.json"

    def note(msg: str) -> None:
        line = f"[{time.monotonic() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        doc["log"].append(line)

    def save() -> None:
        doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
        doc["machine"]["loadavg_end"] = os.getloadavg()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    work = Path(tempfile.mkdtemp(prefix="hw-lim-", dir="/tmp"))
    d = start_daemon(str(work / "d.sock"), "--reserve", "0", "--log-level", "warning")
    prober = Prober(d.socket, d.pid)
    prober.start()
    channel = grpc.insecure_channel(f"unix://{d.socket}")
    stub = pb_grpc.HotweightsStub(channel)
    # loads, unloads and alias moves are operators' calls: the operator socket takes them
    ops = pb_grpc.HotweightsStub(grpc.insecure_channel(f"unix://{d.operator_socket}"))
    note(f"daemon pid {d.pid} on {d.socket}; load average {os.getloadavg()}")

    def phase(name: str, fn) -> None:
        prober.phase = name
        note(f"{name}: start")
        try:
            doc[name] = fn()
        except Exception as exc:
            note(f"{name}: ERROR {type(exc).__name__}: {exc}")
            doc["errors"].append(
                {"where": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            )
        prober.phase = f"{name}:after"
        note(f"{name}: done {json.dumps(doc.get(name), default=str)[:300]}")
        save()

    def field() -> dict:
        huge = "/" + "x" * (args.field_mib * MiB)
        before = rss(d.pid)
        tries = []
        for _ in range(3):
            dt, status = load_call(ops, "m", huge, "v1")
            tries.append({"seconds": round(dt, 4), "status": status})
        after = rss(d.pid)
        return {
            "field_bytes": len(huge),
            "tries": tries,
            "rss_before": before["rss"],
            "rss_after": after["rss"],
            "hwm_before": before["hwm"],
            "hwm_after": after["hwm"],
        }

    def header() -> dict:
        res: dict = {}
        t0 = time.perf_counter()
        big = tiny_header_file(work / "million.safetensors", args.tensors)
        res["million"] = {
            "tensors": args.tensors,
            "file_bytes": big.stat().st_size,
            "write_s": time.perf_counter() - t0,
        }
        before = rss(d.pid)
        dt, status = load_call(ops, "million", str(big), "v1")
        after = rss(d.pid)
        res["million"].update(
            refusal_seconds=round(dt, 4),
            status=status,
            rss_before=before["rss"],
            rss_after=after["rss"],
            hwm_after=after["hwm"],
        )
        big.unlink()
        n = min(100_000, args.tensors // 2)
        ok = tiny_header_file(work / "limit.safetensors", n)
        allocated_before = sum(dev.resident_bytes for dev in stub.Status(pb.StatusRequest(), timeout=60).devices)
        before = rss(d.pid)
        dt, status = load_call(ops, "atlimit", str(ok), "v1")
        after = rss(d.pid)
        info = {}
        if status == "OK":
            st = stub.Status(pb.StatusRequest(), timeout=60)
            # the devices' resident bytes are the allocations' sizes; less what was loaded before
            info = {
                "data_bytes": n,
                "allocated_bytes": sum(dev.resident_bytes for dev in st.devices) - allocated_before,
            }
            ops.UnloadModel(pb.UnloadModelRequest(ref="atlimit@v1"), timeout=60)
        res["at_limit"] = {
            "tensors": n,
            "load_seconds": round(dt, 3),
            "status": status,
            "rss_before": before["rss"],
            "rss_after": after["rss"],
            "hwm_after": after["hwm"],
            **info,
        }
        return res

    def watchers() -> dict:
        small = small_model(work / "w.safetensors")
        dt, status = load_call(ops, "wm", str(small), "v1")
        assert status == "OK", status
        before = rss(d.pid)
        conns = max(1, args.watchers // 100)
        proc = subprocess.Popen(
            [sys.executable, "-c", WATCHERS, d.socket, str(args.watchers), str(conns)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        lines: list[dict] = []
        got = threading.Condition()

        def read() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                with got:
                    lines.append(json.loads(line))
                    got.notify_all()

        threading.Thread(target=read, daemon=True).start()
        res: dict = {"watchers": args.watchers, "connections": conns}
        try:
            # all open (or ended), or no tenth more for 60 s (under load a few streams may get their headers late)
            def settled() -> int:
                return max((x["opened"] + x["unsubscribed"] for x in lines if "opened" in x), default=0)

            t0 = time.perf_counter()
            last = 0
            while last < args.watchers:
                with got:
                    got.wait_for(lambda: settled() > last, 60)
                    now = settled()
                if now == last:
                    break
                last = now
            with got:
                last = max((x.get("opened", 0) for x in lines), default=0)
            res["opened_within_wait"] = last
            res["open_seconds"] = round(time.perf_counter() - t0, 2)
            mid = rss(d.pid)
            res["rss_before"], res["rss_open"] = before["rss"], mid["rss"]
            res["bytes_per_watcher"] = round((mid["rss"] - before["rss"]) / args.watchers)
            lat, fan = [], []
            for i in range(args.alias_moves):
                alias = f"a{i}"
                t0 = time.perf_counter()
                sent = time.time()
                ops.SetAlias(pb.SetAliasRequest(alias=alias, target="wm@v1", create=True), timeout=60)
                lat.append(time.perf_counter() - t0)
                with got:
                    ok = got.wait_for(lambda: any(x.get("alias") == alias for x in lines), 30)
                if ok:
                    t_all = next(x["t"] for x in lines if x.get("alias") == alias)
                    fan.append(t_all - sent)
            res["set_alias_ms"] = {
                "median": round(statistics.median(lat) * 1e3, 2),
                "max": round(max(lat) * 1e3, 2),
                "n": len(lat),
            }
            res["all_watchers_have_event_ms"] = {
                "median": round(statistics.median(fan) * 1e3, 1) if fan else None,
                "max": round(max(fan) * 1e3, 1) if fan else None,
                "n": len(fan),
            }
            with got:
                early = [x for x in lines if "ended" in x]  # before stdin closes: none is ours
            res["ended_early_count"] = len(early)
            res["ended_early"] = early[:5]
            res["rss_after"] = rss(d.pid)["rss"]
        finally:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            res["watchers_at_end"] = [x for x in lines if "open_at_end" in x]
        return res

    def models() -> dict:
        small = small_model(work / "m.safetensors")
        state = Path(str(d.socket) + ".state.json")
        seen_inodes: set[int] = set()
        stop = threading.Event()

        def watch_state() -> None:
            while not stop.is_set():
                try:
                    seen_inodes.add(state.stat().st_ino)
                except FileNotFoundError:
                    pass
                stop.wait(0.01)

        watcher = threading.Thread(target=watch_state, daemon=True)
        watcher.start()
        before = rss(d.pid)
        times = []
        for i in range(args.models):
            dt, status = load_call(ops, f"model{i}", str(small), "v1")
            if status != "OK":
                raise RuntimeError(f"model{i}: {status}")
            times.append(dt)
        stop.set()
        watcher.join()
        after = rss(d.pid)
        k = min(50, len(times) // 2)
        res = {
            "models": args.models,
            "load_ms_first": round(statistics.median(times[:k]) * 1e3, 2),
            "load_ms_last": round(statistics.median(times[-k:]) * 1e3, 2),
            "load_ms_max": round(max(times) * 1e3, 2),
            "rss_before": before["rss"],
            "rss_after": after["rss"],
            "bytes_per_model": round((after["rss"] - before["rss"]) / args.models),
            "state_file_bytes": state.stat().st_size if state.exists() else None,
            "state_file_writes_seen": len(seen_inodes),
            "events": 2 * args.models,  # VERSION_ADDED and VERSION_READY each
        }
        for rpc, req in (("ListModels", pb.ListModelsRequest()), ("Status", pb.StatusRequest())):
            xs = []
            for _ in range(5):
                t0 = time.perf_counter()
                answer = getattr(stub, rpc)(req, timeout=60)
                xs.append(time.perf_counter() - t0)
            res[f"{rpc}_ms"] = {"median": round(statistics.median(xs) * 1e3, 2), "max": round(max(xs) * 1e3, 2)}
            res[f"{rpc}_bytes"] = answer.ByteSize()
        return res

    try:
        # the header phase last: the 100,000-tensor load leaves the daemon's heap larger than it found it
        phase("field", field)
        phase("watchers", watchers)
        phase("models", models)
        phase("header", header)
    finally:
        prober.stop.set()
        prober.join(10)
        doc["health"] = prober.summary()
        doc["daemon_alive_at_end"] = d.alive()
        channel.close()
        d.stop()
        save()
        note(f"wrote {out}")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
