"""`hotweights demo`: the whole path on an embedded default, on any machine.

Writes a small Llama-shaped sharded checkpoint, starts a daemon, loads it, then attaches from a
separate serving process and compares with what a restart without hotweights pays (reading the
checkpoint again with safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from hotweights.testing import Daemon

# Both serving processes import their libraries first, then time getting the rank's weights and
# reading every byte once (what a model's first forward pass does).
SERVE_WITH_HOTWEIGHTS = """
import sys, time, json
import torch, hotweights, hotweights.attach
client = hotweights.connect(sys.argv[1])
t1 = time.perf_counter()
with client.attach("prod", rank=int(sys.argv[2])) as w:
    t2 = time.perf_counter()
    checksum = sum(float(t.float().sum()) for t in w.values())
    t3 = time.perf_counter()
    print(json.dumps({"get_s": t2 - t1, "ready_s": t3 - t1, "tensors": len(w), "checksum": checksum}))
"""

SERVE_FROM_STORAGE = """
import sys, time, json, glob
import torch
from safetensors.torch import load_file
t1 = time.perf_counter()
w = {}
for f in sorted(glob.glob(sys.argv[1] + "/model-rank-%s-part-*.safetensors" % sys.argv[2])):
    w.update(load_file(f))
t2 = time.perf_counter()
checksum = sum(float(t.float().sum()) for t in w.values())
t3 = time.perf_counter()
print(json.dumps({"get_s": t2 - t1, "ready_s": t3 - t1, "tensors": len(w), "checksum": checksum}))
"""


def write_sample(out: Path, size_mb: int, tp: int = 2) -> int:
    """A Llama-like layout of about ``size_mb`` MB per rank, pre-sharded for ``tp`` ranks."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 1024, 2816, 8192
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 2 // tp
    layers = max(1, (size_mb * 10**6 - 2 * vocab * hidden * 2 // tp) // per_layer)
    g = torch.Generator().manual_seed(0)
    total = 0
    out.mkdir(parents=True, exist_ok=True)
    for r in range(tp):
        part: dict = {}
        parts = 0

        def flush():
            nonlocal part, parts, total
            if part:
                save_file(part, str(out / f"model-rank-{r}-part-{parts}.safetensors"))
                total += sum(t.numel() * t.element_size() for t in part.values())
                part, parts = {}, parts + 1

        def w(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

        part["model.embed_tokens.weight"] = w(vocab // tp, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            part[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            for n in ("q", "k", "v"):
                part[p + f"self_attn.{n}_proj.weight"] = w(hidden // tp, hidden)
            part[p + "self_attn.o_proj.weight"] = w(hidden, hidden // tp)
            part[p + "mlp.gate_proj.weight"] = w(inter // tp, hidden)
            part[p + "mlp.up_proj.weight"] = w(inter // tp, hidden)
            part[p + "mlp.down_proj.weight"] = w(hidden, inter // tp)
            part[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            if (i + 1) % 4 == 0:
                flush()
        part["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        part["lm_head.weight"] = w(vocab // tp, hidden)
        flush()
    return total


def _run(code: str, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        raise RuntimeError(f"serving process failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_demo(workdir: Path, size_mb: int = 256) -> int:
    workdir = workdir.resolve()
    ckpt = workdir / "sample-tp2"
    if not (ckpt / "model-rank-1-part-0.safetensors").exists():
        print(f"writing a Llama-shaped TP=2 sample checkpoint ({size_mb} MB per rank) to {ckpt} ...")
        shutil.rmtree(ckpt, ignore_errors=True)
        write_sample(ckpt, size_mb)
    sockdir = tempfile.mkdtemp(prefix="hw-demo-", dir="/tmp")
    sock = os.path.join(sockdir, "hotweights.sock")
    (workdir / "daemon.log").unlink(missing_ok=True)
    try:
        daemon = Daemon.start(
            sock, backend=os.environ.get("HOTWEIGHTS_BACKEND", "auto"), log=workdir / "daemon.log", timeout=60
        )
    except BaseException:
        shutil.rmtree(sockdir, ignore_errors=True)
        raise
    try:
        client = daemon.connect()
        print(f"daemon pid {daemon.pid} serving on {sock} (backend {client.status().backend})")
        t0 = time.perf_counter()
        info = client.load("demo", ckpt, version="v1", alias="prod")
        load_s = time.perf_counter() - t0
        gb = info.bytes / 1e9
        print(
            f"loaded demo@v1 ({len(info.ranks)} ranks, {gb:.2f} GB) in {load_s:.3f} s "
            f"[{gb / load_s:.2f} GB/s, {info.load_path}]"
        )
        cold = [_run(SERVE_FROM_STORAGE, str(ckpt), str(r)) for r in range(len(info.ranks))]
        warm = [_run(SERVE_WITH_HOTWEIGHTS, sock, str(r)) for r in range(len(info.ranks))]
        print(f"{'':8}{'get weights':>14}{'+ read every byte':>20}   (separate serving process per rank)")
        for r, (c, w) in enumerate(zip(cold, warm)):
            assert c["checksum"] == w["checksum"], "attached weights differ from the files"
            print(
                f"rank {r}  safetensors.load_file (page cache) {c['get_s'] * 1e3:9.1f} ms {c['ready_s'] * 1e3:9.1f} ms"
            )
            print(
                f"rank {r}  hotweights attach (zero copy)     {w['get_s'] * 1e3:9.1f} ms {w['ready_s'] * 1e3:9.1f} ms"
                f"   {w['tensors']} tensors"
            )
        print("weights seen by both serving processes are identical (checksums match).")
        print(
            "On a GPU node the first row is a storage read plus a host-to-device copy per process;"
            " the attach row stays a mapping."
        )
        return 0
    finally:
        daemon.stop(timeout=15)
        shutil.rmtree(sockdir, ignore_errors=True)
