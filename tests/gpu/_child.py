"""A separate process for the GPU tests: imports what the test process exported, or exports for it.

Commands (spec as JSON on stdin, answer as one JSON line on stdout):

- ``verify``: opens the regions (fds passed with pass_fds, or legacy IPC handles) through
  ``hotweights.mapping.regions.open_region``, builds every tensor and compares it bit for bit with
  ``safetensors.torch.load_file(device=...)``; optionally then tries to write into a region.
- ``adopt``: a "restarted daemon": adopts a VMM fd with CudaBackend.adopt and reads it back.
- ``exporter``: loads a checkpoint with CudaBackend, sends the layout and its fds over a unix
  socket (SCM_RIGHTS) and waits to be killed.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
import threading
import time


def build(base, p):
    import torch

    raw = base[p["offset"] : p["offset"] + p["nbytes"]]
    dtype = getattr(torch, p["served_dtype"], None)
    if not isinstance(dtype, torch.dtype) or (dtype == torch.uint8 and p["dtype"] != "U8"):
        return raw
    return raw.view(dtype).view(tuple(p["shape"]))


def same_bits(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def verify(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from hotweights.mapping.regions import open_region

    regions = []
    t0 = time.perf_counter()
    for r in spec["regions"]:
        regions.append(
            open_region(r["handle_type"], r["size"], r["device"], r.get("fd"), bytes.fromhex(r.get("ipc_handle", "")))
        )
    for r in spec["regions"]:
        if r.get("fd") is not None:
            os.close(r["fd"])
    opened_s = time.perf_counter() - t0
    out = {"mismatch": [], "ok": 0, "opened_s": opened_s, "devices": [], "writable": [rg.writable for rg in regions]}
    refs = {}
    for i, path in enumerate(spec["files"]):
        dev = spec["file_devices"][i]
        refs[i] = load_file(path, device=f"cuda:{dev}")
    for p in spec["placements"]:
        t = build(regions[p["allocation"]].base, p)
        out["devices"].append(t.device.index)
        if same_bits(t, refs[p["file"]][p["name"]]):
            out["ok"] += 1
        else:
            out["mismatch"].append(p["name"])
    if spec.get("compute"):
        # the weights are usable by kernels, not only copyable
        p = next(p for p in spec["placements"] if p["name"].endswith(".big"))
        w = build(regions[p["allocation"]].base, p)
        out["sum"] = float(w.double().sum().item())
    del refs
    if spec.get("write_probe") and not regions[0].writable:
        try:
            regions[0].base[:16].fill_(1)
            torch.cuda.synchronize()
            out["write_blocked"] = False
        except Exception as exc:  # the expected outcome: the mapping is read-only
            out["write_blocked"] = True
            out["write_error"] = str(exc)[:200]
        print(json.dumps(out), flush=True)
        os._exit(0)  # the context is unusable after the faulting write
    for rg in regions:
        rg.close()
    gc.collect()
    torch.cuda.synchronize()
    return out


def adopt(spec: dict) -> dict:
    from conftest import assert_loaded_exactly

    from hotweightsd.backends.cuda import CudaBackend
    from hotweightsd.core.backend import HandleType
    from hotweightsd.core.layout import Placement, RankLayout
    from hotweightsd.loaders.settings import LoaderSettings

    b = CudaBackend(reserve=0, loader=LoaderSettings(gds="off"))
    allocs = [b.adopt(r["device"], r["size"], HandleType.CUDA_VMM_FD, r["fd"]) for r in spec["regions"]]
    layout = RankLayout(
        0,
        spec["files"],
        [r["size"] for r in spec["regions"]],
        [
            Placement(
                p["name"],
                p["dtype"],
                p["served_dtype"],
                tuple(p["shape"]),
                p["allocation"],
                p["offset"],
                p["nbytes"],
                p["file"],
                p["file_offset"],
            )
            for p in spec["placements"]
        ],
    )
    assert_loaded_exactly(layout, allocs)
    again = allocs[0].export_fd()
    os.close(again)
    for a in allocs:
        a.close()
    b.close()
    return {"adopted": len(allocs)}


def exporter(spec: dict) -> None:
    from pathlib import Path

    from conftest import backend, load, placements_json

    b = backend()
    layout, allocs, desc = load(b, Path(spec["checkpoint"]))
    fds = [a.export_fd() for a in allocs]
    msg = json.dumps(
        {
            "placements": placements_json(layout),
            "files": layout.files,
            "description": desc,
            "regions": [{"handle_type": a.handle_type.value, "size": a.size, "device": a.device} for a in allocs],
            "pid": os.getpid(),
        }
    ).encode()
    sock = socket.socket(fileno=spec["socket_fd"])
    sock.sendall(len(msg).to_bytes(8, "little"))
    socket.send_fds(sock, [msg], fds)
    for fd in fds:
        os.close(fd)
    threading.Event().wait()  # until SIGKILL


def main() -> None:
    command = sys.argv[1]
    spec = json.loads(sys.stdin.read() or "{}")
    if command == "exporter":
        exporter(spec)
        return
    result = {"verify": verify, "adopt": adopt}[command](spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
