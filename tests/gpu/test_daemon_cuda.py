"""The real daemon on the cuda backend: load, attach from separate processes, free, survive.

Skipped (see conftest.py here) where no GPU or cuda-bindings is present.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import gpu_count, write_checkpoint  # noqa: E402

from hotweights.testing import read_line  # noqa: E402
from support.ckpt_tools import write_model  # noqa: E402
from support.daemons import (  # noqa: E402
    Daemon,
    run_client,
    serve_command,
    short_tmpdir,
    spawn_client,
    start_daemon,
    wait_until,
)


def cuda_daemon(sock: str, *extra: str) -> Daemon:
    return start_daemon(sock, "--reserve", "1GiB", *extra, backend="cuda")


@pytest.fixture
def gpu_daemon():
    d = short_tmpdir()
    try:
        daemon = cuda_daemon(str(Path(d) / "hw.sock"))
        try:
            yield daemon
        finally:
            code = daemon.stop()
        assert code == 0, daemon.logs()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def attach_and_compare(d: Daemon, path: Path, ref: str, rank: int = 0) -> None:
    r = run_client("gpu_attach_compare", d.socket, str(path), ref, str(rank), timeout=300)
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
    wait_until(lambda: _free() >= before - 64 * 2**20, what=f"device memory back to {before} - 64 MiB free")


def test_refused_load_and_truncated_file_leak_nothing(tmp_path):
    import torch

    d = short_tmpdir()
    total = torch.cuda.mem_get_info(0)[1]
    try:
        with start_daemon(str(Path(d) / "hw.sock"), "--reserve", str(total), backend="cuda") as daemon:
            before = _free()
            r = daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")))
            assert r.returncode == 1 and "does not fit on device 0" in r.stderr, r.stderr
            p = write_model(tmp_path / "t.safetensors")
            p.write_bytes(p.read_bytes()[:-4096])
            r = daemon.cli("load", "t", str(p))
            assert r.returncode == 1 and "truncated" in r.stderr
            assert daemon.status()["open_allocations"] == 0
            assert _free() >= before - 64 * 2**20
            assert daemon.stop() == 0, daemon.logs()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_client_keeps_computing_after_daemon_sigkill(tmp_path):
    d = short_tmpdir()
    try:
        with cuda_daemon(str(Path(d) / "hw.sock")) as daemon:
            daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
            p = spawn_client("gpu_hold_and_compute", daemon.socket, "m")
            assert read_line(p, what='"attached" from the client').strip() == "attached"
            daemon.stop(signal.SIGKILL)
            out, err = p.communicate("go\n", timeout=120)
            assert "still-computing" in out, err
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_restart_under_service_manager_rereads_nothing(tmp_path):
    from support.svcmgr import ServiceManager

    d = short_tmpdir()
    sock = str(Path(d) / "hw.sock")
    cmd = serve_command(sock, "--reserve", "1GiB", backend="cuda", config="none")
    with ServiceManager(d) as svc:
        svc.start(cmd)
        svc.wait_for("READY", "1", timeout=60)
        daemon = Daemon(sock, svc.process, svc.log_path).wait_ready()
        a = write_model(tmp_path / "a" / "a.safetensors", seed=1)
        b = write_model(tmp_path / "b" / "b.safetensors", seed=2)
        daemon.cli("load", "alpha", str(a), "--version", "v1", "--alias", "prod", check=True)
        daemon.cli("load", "beta", str(b), "--version", "v2", check=True)
        holder = spawn_client("gpu_hold_and_compute", sock, "prod")
        assert read_line(holder, what='"attached" from the holder').strip() == "attached"
        svc.stop(signal.SIGKILL)
        keep = tmp_path / "keep"
        keep.mkdir()
        shutil.move(str(a), keep / "a.safetensors")
        shutil.move(str(b), keep / "b.safetensors")
        svc.start(cmd)
        svc.wait_for("READY", "1", timeout=60)
        daemon = Daemon(sock, svc.process, svc.log_path).wait_ready()
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
    ckpt = write_checkpoint(tmp_path / "tp2", ranks=2, parts=1)
    gpu_daemon.cli("load", "tp2", str(ckpt), check=True)
    r = run_client(
        "gpu_attach_rank1_alone", gpu_daemon.socket, str(ckpt), timeout=300, check=False, CUDA_VISIBLE_DEVICES="1"
    )
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
