"""Attach through a real daemon, clients in separate processes."""

from __future__ import annotations

import json
import signal

import pytest

from hotweights.testing import read_line
from support.ckpt_tools import layered_tensors, write_model
from support.daemons import run_cli, run_client, spawn_client, start_daemon, wait_until


def test_separate_client_loads_and_attaches_bit_exact_zero_copy(daemon, tmp_path):
    ckpt = write_model(tmp_path / "mixed.safetensors")
    r = run_client("attach_and_compare", daemon.socket, str(ckpt))
    assert r.stdout.startswith("OK 11"), r.stdout + r.stderr


def test_sigkilled_client_loses_lease_and_memory_is_released(daemon, tmp_path):
    ckpt = write_model(tmp_path / "m.safetensors")
    daemon.cli("load", "m", str(ckpt), check=True)
    holder = spawn_client("hold_lease", daemon.socket, "m")
    assert read_line(holder, what='"attached" from the holder').strip() == "attached"
    leases = daemon.status()["leases"]
    assert len(leases) == 1 and leases[0]["pid"] == holder.pid

    # unload is refused while the lease lives, and says why
    r = daemon.cli("unload", "m")
    assert r.returncode != 0
    assert "live lease" in r.stderr and "--force" in r.stderr
    assert len(daemon.memfds()) == 1

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    wait_until(lambda: not daemon.leases(), what="the killed client's lease to end", interval=0.02)
    assert daemon.status()["leases"] == []

    daemon.cli("unload", "m", check=True)
    assert daemon.memfds() == []
    assert daemon.status()["resident_bytes"] == 0


def test_force_unload_keeps_client_mapping_valid(daemon, tmp_path):
    ckpt = write_model(tmp_path / "m.safetensors")
    daemon.cli("load", "m", str(ckpt), check=True)
    p = spawn_client("hold_through_force_unload", daemon.socket, str(ckpt))
    assert read_line(p, what='"attached" from the client').strip() == "attached"
    r = daemon.cli("unload", "m", "--force")
    assert r.returncode == 0, r.stderr
    assert daemon.memfds() == []
    out, err = p.communicate("go\n", timeout=30)
    assert "still-valid" in out, err


def test_release_ends_lease_and_with_block(daemon, client, tmp_path):
    ckpt = write_model(tmp_path / "m.safetensors")
    client.load("m", ckpt)
    w = client.attach("m", holder="unit-test")
    st = daemon.status()
    assert [le["holder"] for le in st["leases"]] == ["unit-test"]
    t = w["f32"]
    w.release()
    assert daemon.status()["leases"] == []
    assert float(t.sum()) == float(t.sum())  # tensors outlive the lease while referenced
    with client.attach("m") as w2:
        assert len(w2) == 11
        assert len(daemon.status()["leases"]) == 1
    assert daemon.status()["leases"] == []


def test_second_daemon_on_same_socket_refuses_and_first_keeps_serving(daemon, tmp_path):
    ckpt = write_model(tmp_path / "m.safetensors")
    daemon.cli("load", "m", str(ckpt), check=True)
    second = start_daemon(daemon.socket, wait=False, log=tmp_path / "second.log")
    try:
        code = second.proc.wait(timeout=60)
    finally:
        second.stop()
    assert code != 0
    text = second.logs()
    assert "already serves" in text and daemon.socket in text, text
    assert daemon.alive()
    listed = json.loads(daemon.cli("list", "--json", check=True).stdout)
    assert [v["name"] for v in listed["versions"]] == ["m"]


def test_stale_socket_file_is_replaced(sockdir, tmp_path):
    import socket as so

    path = str(sockdir / "stale.sock")
    s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: a crashed daemon's leftover
    d = start_daemon(path)
    try:
        assert d.status()["pid"] == d.pid
    finally:
        assert d.stop() == 0


def test_socket_is_group_accessible_only(daemon):
    import os
    import stat

    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660, oct(mode)


def test_load_cli_reports_progress_result_and_json(daemon, tmp_path):
    ckpt = write_model(tmp_path / "m.safetensors")
    r = daemon.cli("load", "m", str(ckpt), "--version", "v1", "--json", check=True)
    info = json.loads(r.stdout)
    assert info["name"] == "m" and info["version"] == "v1" and info["state"] == "READY"
    assert int(info["bytes"]) > 4_000_000
    r = daemon.cli("list")
    assert "m@v1  READY" in r.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_stops_gracefully_and_removes_its_socket(sockdir, sig):
    import os

    d = start_daemon(str(sockdir / "g.sock"))
    assert d.stop(sig) == 0, d.logs()  # stop() ends the process either way: SIGKILL after its timeout
    assert not os.path.exists(d.socket)


def test_doctor_reports_the_node_and_the_daemon(daemon):
    r = daemon.cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["daemon"]["ok"] and f"pid {daemon.pid}" in checks["daemon"]["detail"]
    assert "GPUDirect Storage" in checks and "package torch" in checks


def test_doctor_fails_without_a_daemon(sockdir):
    r = run_cli("doctor", "--socket", str(sockdir / "x.sock"))
    assert r.returncode == 1 and "FAIL  daemon" in r.stdout


def test_layered_model_attaches_bit_exact_from_the_compact_table(daemon, tmp_path):
    ckpt = write_model(tmp_path / "layered.safetensors", layered_tensors())
    daemon.cli("load", "layered", str(ckpt), check=True)
    r = run_client("attach_layered_table", daemon.socket, str(ckpt))
    assert r.stdout.startswith("OK 123"), r.stdout + r.stderr
