#!/usr/bin/env python3
"""Time to the first forward of a fresh serving process: the daemon's weights vs reading them.

A Llama-shaped model (bf16, ``--size-gb`` of weights, one safetensors file with config.json) is
written once and loaded into a real daemon. Then fresh Python processes, interleaved ``--reps``
times, each build the model and run one forward on the same 32 tokens, three ways:

- ``hotweights``: ``hotweights.transformers.from_hotweights`` (zero copy: the daemon's memory).
- ``from_pretrained``: transformers from the page cache (the file is read once before the runs).
- ``by_hand``: ``from_config`` on the device, then ``load_state_dict(assign=True)`` from
  ``safetensors.torch.load_file`` onto the device (what people write when from_pretrained is slow).

And ``attach_only`` (the floor under the first route: attach and map every tensor, no model). Each
child reports seconds from just after ``import torch`` to the forward's result on the host (and
the part of it spent importing transformers and hotweights), the
process's peak allocator memory and the device memory it added; its logits go to a file, and
the parent compares every route's logits with from_pretrained's, element for element.

    python benchmarks/bench_first_forward.py --out benchmarks/results          (on a GPU node)
    python benchmarks/bench_first_forward.py --backend cpu --size-gb 0.2       (a smoke run anywhere)

Writes ``first-forward-<device>-<date>.json`` into each ``--out`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ("hotweights", "from_pretrained", "by_hand", "attach_only")
TOKENS = 32
# Llama-3-8B's layer shape; the layer count sets the size.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 32000


def llama_config(size_gb: float, hidden: int = HIDDEN):
    from transformers import LlamaConfig

    scale = hidden / HIDDEN
    inter, vocab = int(INTERMEDIATE * scale) // 64 * 64, VOCAB
    head_dim = 128 if hidden >= 1024 else 32
    heads, kv = max(1, hidden // head_dim), max(1, hidden // head_dim // 4)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def write_model(directory: Path, cfg) -> int:
    """Random bf16 weights (std 0.02, norms 1) for every parameter of ``cfg``'s model; returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(directory))
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- the child: one fresh serving process --------------------------------------------------------


def child(route: str, model_dir: str, socket: str, ref: str, device: str, logits_path: str) -> dict:
    import torch

    t0 = time.perf_counter()  # the clock starts once torch is imported, as a serving process has it
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out: dict = {"route": route}
    if cuda:
        torch.cuda.init()
        free0, total = torch.cuda.mem_get_info(dev)
        out["cuda_init_s"] = time.perf_counter() - t0
    if route == "attach_only":
        import hotweights

        client = hotweights.connect(socket)
        att = client.attach(ref)
        n = sum(att[name].numel() for name in att)
        out["tensors"], out["elements"] = len(list(att)), n
        out["seconds"] = time.perf_counter() - t0
        att.release()
        client.close()
        return out
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    # transformers imports lazily: touching the model's classes pulls in its code (and torch.distributed)
    # here, in the import phase, for every route alike
    assert LlamaConfig and LlamaForCausalLM
    if route == "hotweights":
        t1 = time.perf_counter()
        from hotweights.transformers import from_hotweights

        out["hotweights_import_s"] = time.perf_counter() - t1
    out["imports_s"] = time.perf_counter() - t0 - out.get("cuda_init_s", 0.0)
    if route == "hotweights":
        model = from_hotweights(ref, socket=socket)
    elif route == "from_pretrained":
        import importlib.util

        # device_map needs accelerate; without it from_pretrained reads to host memory and .to() copies
        direct = cuda and importlib.util.find_spec("accelerate") is not None
        out["device_map"] = direct
        if direct:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev)
    elif route == "by_hand":
        from safetensors.torch import load_file
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors"), device=str(dev)), assign=True)
        model.eval()
    else:
        raise SystemExit(f"unknown route {route!r}")
    out["built_s"] = time.perf_counter() - t0
    ids = (torch.arange(1, TOKENS + 1) * 7919 % model.config.vocab_size).unsqueeze(0).to(dev)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()  # .cpu() waits for the device
    out["seconds"] = time.perf_counter() - t0
    if cuda:
        free1, _ = torch.cuda.mem_get_info(dev)
        out["allocator_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["device_bytes_added"] = free0 - free1
    out["param_devices"] = sorted({str(p.device) for p in model.parameters()})
    torch.save(logits, logits_path)
    if route == "hotweights":
        model.hotweights_release()
    return out


def _version(dist: str) -> str | None:
    """The installed version of ``dist``; None where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def import_profile(env: dict) -> dict:
    """What importing transformers' Llama classes costs after ``import torch`` in a fresh process, and
    where it goes: ``python -X importtime``'s self time summed per top-level package."""
    code = "import torch\nfrom transformers import LlamaForCausalLM\nassert LlamaForCausalLM"
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env)
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[0].split()[-1].isdigit():
            rows.append((int(parts[0].split()[-1]), parts[2].rstrip()))
    # the rows after torch's own top-level entry are what the transformers import added
    last_torch = max((i for i, (_, name) in enumerate(rows) if name.strip() == "torch"), default=-1)
    by_package: dict[str, float] = {}
    for us, name in rows[last_torch + 1 :]:
        top = name.strip().split(".")[0]
        by_package[top] = by_package.get(top, 0.0) + us / 1e6
    top = sorted(by_package.items(), key=lambda kv: -kv[1])[:12]
    return {
        "returncode": r.returncode,
        "seconds_after_torch": round(sum(by_package.values()), 3),
        "by_package_s": {k: round(v, 3) for k, v in top},
    }


def run_child(route: str, model_dir: Path, socket: str, ref: str, device: str, logits: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", route, "--model-dir", str(model_dir), "--socket", socket]
    cmd += ["--ref", ref, "--device", device, "--logits", str(logits)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{route} child failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1])


# --- the parent ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=6.0, help="weight bytes of the model, in GB (default 6)")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (smaller for a smoke run)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each route, interleaved (default 3)")
    ap.add_argument("--backend", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--workdir", default="", help="where the model is written (default: a temporary folder)")
    ap.add_argument("--out", action="append", default=[], help="results folder (repeatable)")
    ap.add_argument(
        "--bytecode-cache",
        action="store_true",
        help="serving processes read and write bytecode in a cache of their own, as on an install that has it "
        "(pip writes bytecode when it installs); without it they run as the machine's environment says",
    )
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--socket", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ref", default="", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="", help=argparse.SUPPRESS)
    ap.add_argument("--logits", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.socket, args.ref, args.device, args.logits)))
        return 0

    sys.path[:0] = [str(ROOT / "client"), str(ROOT / "daemon")]
    # a time box's SIGTERM unwinds through the finally below: the daemon is stopped and what was measured kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch
    from bench_load import boot_id  # this script's folder is the first on sys.path

    from hotweights.testing import Daemon, child_env

    device = "cuda:0" if args.backend == "cuda" else "cpu"
    name = torch.cuda.get_device_name(0) if args.backend == "cuda" else "cpu"
    safe = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    doc: dict = {
        "benchmark": "first forward of a fresh serving process",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": name,
        "backend": args.backend,
        "torch": torch.__version__,
        # what the imports cost depends on it (older transformers import scikit-learn, scipy and pandas)
        "versions": {d: _version(d) for d in ("transformers", "accelerate", "scikit-learn", "scipy", "torchvision")},
        "tokens": TOKENS,
        # tells two runs on one machine (booted once) from runs on two
        "boot_id": boot_id(),
    }
    started = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hw-ff-"))
    sockdir = tempfile.mkdtemp(prefix="hw-ff-", dir="/tmp")
    daemon = None
    try:
        cfg = llama_config(args.size_gb, args.hidden)
        model_dir = work / "model"
        t = time.perf_counter()
        weight_bytes = write_model(model_dir, cfg)
        doc["model"] = {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "weight_bytes": weight_bytes,
            "write_s": round(time.perf_counter() - t, 1),
        }
        print(f"model: {cfg.num_hidden_layers} layers, {weight_bytes / 1e9:.2f} GB", flush=True)
        with open(model_dir / "model.safetensors", "rb") as f:  # page cache warm for the reading routes
            while f.read(64 << 20):
                pass
        env = child_env()
        doc["bytecode_cache"] = args.bytecode_cache
        if args.bytecode_cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        daemon = Daemon.start(
            os.path.join(sockdir, "hw.sock"), backend=args.backend, log=work / "daemon.log", env=env, timeout=120
        )
        client = daemon.connect()
        t = time.perf_counter()
        client.load("ff", model_dir, version="v1")
        doc["daemon_load_s"] = round(time.perf_counter() - t, 2)
        if args.bytecode_cache:
            import_profile(env)  # fills the cache: the profile below is of a process that finds it filled
        doc["transformers_import"] = import_profile(env)
        print(f"importing transformers after torch: {doc['transformers_import']['by_package_s']}", flush=True)
        # One untimed round of every route first: whatever a first run on this machine pays once (libraries
        # and kernels read from disk, caches filled) is paid there, not by whichever route is timed first.
        t = time.perf_counter()
        for route in ROUTES:
            try:
                run_child(route, model_dir, daemon.socket, "ff", device, work / f"warm-{route}.pt", env)
            except Exception as exc:  # the timed rounds still run; the JSON says what the warm-up lacked
                doc.setdefault("warmup_errors", []).append(f"{route}: {exc}")
        doc["warmup_round_s"] = round(time.perf_counter() - t, 1)
        print(f"untimed warm-up round: {doc['warmup_round_s']} s", flush=True)
        runs: dict[str, list[dict]] = {r: [] for r in ROUTES}
        doc["runs"] = runs  # filled in place: a run cut short keeps the repetitions it finished
        for rep in range(args.reps):
            # interleaved, so drift on the machine touches every route alike, and rotated, so no route always
            # runs first in its round
            order = ROUTES[rep % len(ROUTES) :] + ROUTES[: rep % len(ROUTES)]
            for position, route in enumerate(order):
                logits = work / f"logits-{route}-{rep}.pt"
                got = run_child(route, model_dir, daemon.socket, "ff", device, logits, env)
                got["logits"] = str(logits) if logits.exists() else None
                got["position"] = position
                runs[route].append(got)
                print(f"rep {rep} {route}: {got['seconds']:.3f} s", flush=True)
        reference = torch.load(work / "logits-from_pretrained-0.pt")
        for v in runs.values():
            for got in v:
                path = got.pop("logits")
                if path is not None:
                    got["logits_equal_from_pretrained"] = bool(torch.equal(torch.load(path), reference))
                if "imports_s" in got:  # CUDA's start stays in: every serving process pays it
                    got["after_imports_s"] = got["seconds"] - got["imports_s"]
        doc["median_s"] = {r: round(statistics.median(x["seconds"] for x in v), 3) for r, v in runs.items() if v}
        doc["median_imports_s"] = {
            r: round(statistics.median(x["imports_s"] for x in v), 3)
            for r, v in runs.items()
            if v and "imports_s" in v[0]
        }
        doc["median_after_imports_s"] = {
            r: round(statistics.median(x["after_imports_s"] for x in v), 3)
            for r, v in runs.items()
            if v and "after_imports_s" in v[0]
        }
        if runs["hotweights"]:  # the part of the hotweights route's imports that is its own
            doc["median_hotweights_import_s"] = round(
                statistics.median(x["hotweights_import_s"] for x in runs["hotweights"]), 4
            )
        for route in ("hotweights", "from_pretrained", "by_hand"):
            doc.setdefault("logits_equal_from_pretrained", {})[route] = all(
                x.get("logits_equal_from_pretrained", False) for x in runs[route]
            )
        if args.backend == "cuda":
            doc["median_allocator_peak_gb"] = {
                r: round(statistics.median(x["allocator_peak_bytes"] for x in v) / 1e9, 2)
                for r, v in runs.items()
                if v and "allocator_peak_bytes" in v[0]
            }
        print(json.dumps({k: doc[k] for k in doc if k.startswith(("median", "logits"))}, indent=1), flush=True)
    finally:
        # The unwinding itself must not be cut short by a second SIGTERM (the time box signals the whole
        # process group); its SIGKILL stays the hard stop, so the daemon gets a short grace only.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        doc["elapsed_s"] = round(time.perf_counter() - started, 1)
        for out in args.out:
            Path(out).mkdir(parents=True, exist_ok=True)
            path = Path(out) / f"first-forward-{safe}-{time.strftime('%Y%m%d-%H%M%S')}.json"
            tmp = path.with_suffix(".json.part")  # a JSON is whole or absent
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, path)
        try:
            if daemon is not None:
                daemon.stop(timeout=5)
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
