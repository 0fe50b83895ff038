"""The real daemon on the cuda backend: load, attach from separate processes, free, survive.

Skipped (see conftest.py here) where no GPU or cuda-bindings is present.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import gpu_count, write_checkpoint  # noqa: E402

from support.ckpt_tools import write_model  # noqa: E402
from support.daemons import Daemon, run_client, short_tmpdir, spawn_client, start_daemon, wait_for_socket  # noqa: E402


def cuda_daemon(sock: str, *extra: str) -> Daemon:
    return start_daemon(sock, "--backend", "cuda", "--reserve", "1GiB", *extra)


@pytest.fixture
def gpu_daemon():
    d = short_tmpdir()
    daemon = cuda_daemon(str(Path(d) / "hw.sock"))
    yield daemon
    assert daemon.stop() == 0, daemon.logs()
    shutil.rmtree(d, ignore_errors=True)


COMPARE = """
import sys, glob, os, torch, hotweights
sys.path.insert(0, sys.argv[3])
from support.ckpt_tools import same_bits
from safetensors.torch import load_file
sock, path, _, ref, rank = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
files = [path] if path.endswith(".safetensors") else (
    sorted(glob.glob(os.path.join(path, f"model-rank-{rank}-*.safetensors")))
    or sorted(glob.glob(os.path.join(path, "*.safetensors"))))
want = {}
for f in files:
    want.update(load_file(f, device=f"cuda:{rank}"))
with hotweights.connect(sock).attach(ref, rank=rank) as w:
    assert sorted(w) == sorted(want)
    for k, t in w.items():
        assert t.device == torch.device("cuda", rank), (k, t.device)
        assert same_bits(t.cpu(), want[k].cpu()), k
    print("OK", len(w), flush=True)
"""


def attach_and_compare(d: Daemon, path: Path, ref: str, rank: int = 0) -> None:
    r = run_client(COMPARE, d.socket, str(path), str(TESTS), ref, str(rank), timeout=300)
    assert r.stdout.startswith("OK"), r.stdout + r.stderr


def test_single_file_and_directory_load_attach_bit_exact(gpu_daemon, tmp_path):
    f = write_model(tmp_path / "one.safetensors")
    gpu_daemon.cli("load", "one", str(f), check=True)
    attach_and_compare(gpu_daemon, f, "one")
    write_model(tmp_path / "dir" / "a.safetensors", seed=3)
    write_model(tmp_path / "dir" / "b.safetensors", {"other": __import__("torch").arange(100)})
    gpu_daemon.cli("load", "dir", str(tmp_path / "dir"), check=True)
    attach_and_compare(gpu_daemon, tmp_path / "dir", "dir")
    info = gpu_daemon.status()
    assert info["backend"] == "cuda"
    assert all("bounce" in v["load_path"] or "gds" in v["load_path"] for v in info["versions"])


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_two_rank_sharded_load_puts_rank_r_on_gpu_r(gpu_daemon, tmp_path):
    ckpt = write_checkpoint(tmp_path / "tp2", ranks=2, parts=2)
    gpu_daemon.cli("load", "tp2", str(ckpt), check=True)
    ranks = gpu_daemon.status()["versions"][0]["ranks"]
    assert [(r["rank"], r["device"]) for r in ranks] == [(0, 0), (1, 1)]
    for rank in (0, 1):
        attach_and_compare(gpu_daemon, ckpt, "tp2", rank)


def test_legacy_ipc_allocation_attach(gpu_daemon, tmp_path):
    f = write_model(tmp_path / "ipc.safetensors")
    gpu_daemon.cli("load", "ipc", str(f), "--legacy-ipc", check=True)
    attach_and_compare(gpu_daemon, f, "ipc")


def _free(device: int = 0) -> int:
    import torch

    return torch.cuda.mem_get_info(device)[0]


def test_unload_returns_device_memory(gpu_daemon, tmp_path):
    import torch

    big = write_model(tmp_path / "big.safetensors", {"w": torch.randn(256 * 2**20 // 4)})  # 256 MiB
    before = _free()
    gpu_daemon.cli("load", "big", str(big), check=True)
    attach_and_compare(gpu_daemon, big, "big")
    loaded = _free()
    assert before - loaded >= 256 * 2**20
    gpu_daemon.cli("unload", "big", check=True)
    time.sleep(0.5)
    assert _free() >= before - 64 * 2**20, (before, _free())


def test_refused_load_and_truncated_file_leak_nothing(tmp_path):
    import torch

    d = short_tmpdir()
    total = torch.cuda.mem_get_info(0)[1]
    daemon = start_daemon(str(Path(d) / "hw.sock"), "--backend", "cuda", "--reserve", str(total))
    try:
        before = _free()
        r = daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")))
        assert r.returncode == 1 and "does not fit on device 0" in r.stderr, r.stderr
        p = write_model(tmp_path / "t.safetensors")
        p.write_bytes(p.read_bytes()[:-4096])
        r = daemon.cli("load", "t", str(p))
        assert r.returncode == 1 and "truncated" in r.stderr
        assert daemon.status()["open_allocations"] == 0
        assert _free() >= before - 64 * 2**20
    finally:
        assert daemon.stop() == 0
        shutil.rmtree(d, ignore_errors=True)


HOLD_AND_COMPUTE = """
import sys, torch, hotweights
w = hotweights.connect(sys.argv[1]).attach("m")
x = w["big"]
def compute():
    return float((x @ x.T).double().sum())
first = compute()
print("attached", flush=True)
sys.stdin.readline()
assert compute() == first
assert float(w["f32"].double().sum()) == float(w["f32"].double().sum())
print("still-computing", flush=True)
"""


def test_client_keeps_computing_after_daemon_sigkill(tmp_path):
    d = short_tmpdir()
    daemon = cuda_daemon(str(Path(d) / "hw.sock"))
    try:
        daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
        p = spawn_client(HOLD_AND_COMPUTE, daemon.socket)
        assert p.stdout.readline().strip() == "attached", p.stderr.read()
        daemon.stop(signal.SIGKILL)
        out, err = p.communicate("go\n", timeout=120)
        assert "still-computing" in out, err
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_restart_under_service_manager_rereads_nothing(tmp_path):
    from support.svcmgr import ServiceManager

    d = short_tmpdir()
    sock = str(Path(d) / "hw.sock")
    cmd = [
        sys.executable,
        "-m",
        "hotweights",
        "serve",
        "--socket",
        sock,
        "--backend",
        "cuda",
        "--reserve",
        "1GiB",
        "--log-format",
        "json",
    ]
    with ServiceManager(d) as svc:
        svc.start(cmd)
        svc.wait_for("READY", "1", timeout=60)
        daemon = Daemon(sock, svc.process, Path(d) / "x.log")
        wait_for_socket(daemon)
        a = write_model(tmp_path / "a" / "a.safetensors", seed=1)
        b = write_model(tmp_path / "b" / "b.safetensors", seed=2)
        daemon.cli("load", "alpha", str(a), "--version", "v1", "--alias", "prod", check=True)
        daemon.cli("load", "beta", str(b), "--version", "v2", check=True)
        holder = spawn_client(HOLD_AND_COMPUTE.replace('attach("m")', 'attach("prod")'), sock)
        assert holder.stdout.readline().strip() == "attached", holder.stderr.read()
        svc.stop(signal.SIGKILL)
        keep = tmp_path / "keep"
        keep.mkdir()
        shutil.move(str(a), keep / "a.safetensors")
        shutil.move(str(b), keep / "b.safetensors")
        svc.start(cmd)
        svc.wait_for("READY", "1", timeout=60)
        daemon = Daemon(sock, svc.process, Path(d) / "x.log")
        wait_for_socket(daemon)
        st = daemon.status()
        assert st["restored"] is True, st["restore_note"]
        assert {(v["name"], v["version"]) for v in st["versions"]} == {("alpha", "v1"), ("beta", "v2")}
        attach_and_compare(daemon, keep / "a.safetensors", "prod")
        attach_and_compare(daemon, keep / "b.safetensors", "beta@v2")
        out, err = holder.communicate("go\n", timeout=120)
        assert "still-computing" in out, err
        assert svc.stop() == 0
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs")
def test_client_with_its_own_visible_devices_maps_the_right_gpu(gpu_daemon, tmp_path):
    """Rank 1 lives on the daemon's cuda:1; a client that sees only that GPU calls it cuda:0."""
    import os
    import subprocess

    ckpt = write_checkpoint(tmp_path / "tp2", ranks=2, parts=1)
    gpu_daemon.cli("load", "tp2", str(ckpt), check=True)
    code = """
import sys, glob, torch, hotweights
sys.path.insert(0, sys.argv[3])
from support.ckpt_tools import same_bits
from safetensors.torch import load_file
want = {}
for f in sorted(glob.glob(sys.argv[2] + "/model-rank-1-*.safetensors")):
    want.update(load_file(f))
assert torch.cuda.device_count() == 1
with hotweights.connect(sys.argv[1]).attach("tp2", rank=1) as w:
    for k, t in w.items():
        assert t.device == torch.device("cuda", 0), t.device
        assert same_bits(t.cpu(), want[k]), k
print("OK", len(w))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code, gpu_daemon.socket, str(ckpt), str(TESTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
