"""A daemon restart (cpu backend) under an emulated service manager
serves the same models without touching storage; a bad state file is refused clearly."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from hotweights.testing import read_line
from support.ckpt_tools import write_model
from support.daemons import Daemon, run_client, serve_command, short_tmpdir, spawn_client, start_daemon, wait_until
from support.svcmgr import ServiceManager


def _daemon_cmd(sock: str) -> list[str]:
    return serve_command(sock, config="none")  # never the host's config file


def _as_daemon(svc: ServiceManager, sock: str) -> Daemon:
    """The service manager's current process, once it answers on ``sock``."""
    return Daemon(sock, svc.process, svc.log_path).wait_ready()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_serves_both_models_without_storage_and_client_never_notices(svc, tmp_path, sig):
    sock = str(svc.tmpdir / "hw.sock")
    svc.start(_daemon_cmd(sock))
    svc.wait_for("READY", "1")
    d = _as_daemon(svc, sock)
    a = write_model(tmp_path / "a" / "a.safetensors", seed=1)
    b = write_model(tmp_path / "b" / "b.safetensors", seed=2)
    d.cli("load", "alpha", str(a), "--version", "v1", "--alias", "prod", check=True)
    d.cli("load", "beta", str(b), "--version", "v7", check=True)
    assert len(svc.stored_fds) == 2

    holder = spawn_client("hold_across_restart", sock, "prod")
    assert read_line(holder, what='"attached" from the holder').strip() == "attached"

    svc.stop(sig)
    if sig == signal.SIGTERM:
        assert any("STOPPING" in m.fields for m in svc.messages)
    # the checkpoints are gone: a restart that served them must not have read storage
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    svc.start(_daemon_cmd(sock))
    svc.wait_for("READY", "1")
    d = _as_daemon(svc, sock)
    st = d.status()
    assert st["restored"] is True, st["restore_note"]
    assert {(v["name"], v["version"], v["state"]) for v in st["versions"]} == {
        ("alpha", "v1", "READY"),
        ("beta", "v7", "READY"),
    }
    assert {a["alias"]: a["version"] for a in st["aliases"]} == {"prod": "v1"}

    # a new client attaches to both restored models, and sees the original bytes
    r = run_client("attach_restored", sock)
    assert r.stdout.strip() == "ok"

    holder.stdin.write("go\n")
    holder.stdin.flush()
    line = read_line(holder, what="the holder's next line").split()
    assert line[0] == "same-after-restart", line
    # the holder re-leased its version on the new daemon, so it is protected there too
    st = d.wait_status(lambda s: any(le["holder"] == "restart-test" for le in s["leases"]))
    assert any(le["holder"] == "restart-test" and le["version"] == "v1" for le in st["leases"])
    d.cli("alias", "prod", "--remove", check=True)
    refused = d.cli("unload", "alpha@v1")
    assert refused.returncode == 1 and "live lease" in refused.stderr
    holder.stdin.write("done\n")
    holder.stdin.flush()
    assert holder.wait(60) == 0, holder.stderr.read()
    assert svc.stop() == 0


def test_unload_removes_fds_from_the_store(svc, tmp_path):
    sock = str(svc.tmpdir / "hw.sock")
    svc.start(_daemon_cmd(sock))
    svc.wait_for("READY", "1")
    d = _as_daemon(svc, sock)
    d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
    assert list(svc.stored_fds) == ["hw/m@v1/0/0"]
    d.cli("unload", "m", check=True)
    wait_until(lambda: svc.stored_fds == {}, what="the unloaded version's fds to leave the store", context=svc.output)
    assert svc.stop() == 0


def _start_and_load(svc, tmp_path) -> str:
    sock = str(svc.tmpdir / "hw.sock")
    svc.start(_daemon_cmd(sock))
    svc.wait_for("READY", "1")
    d = _as_daemon(svc, sock)
    d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
    svc.stop(signal.SIGKILL)
    return sock


def test_corrupted_state_file_is_refused_and_nothing_is_served(svc, tmp_path):
    sock = _start_and_load(svc, tmp_path)
    state = Path(sock + ".state.json")  # the state file is the socket's: <socket>.state.json
    data = bytearray(state.read_bytes())
    i = data.index(b'"m"')
    data[i + 1] = ord("X")
    state.write_bytes(bytes(data))
    svc.start(_daemon_cmd(sock))
    svc.wait_for("READY", "1")
    st = _as_daemon(svc, sock).status()
    assert st["versions"] == [] and st["restored"] is False
    assert "is corrupted" in st["restore_note"] and "hw.sock.state.json" in st["restore_note"]
    assert svc.stored_fds == {}  # the unusable fds were dropped from the store
    assert svc.stop() == 0


def test_state_file_that_disagrees_with_fds_is_refused_and_its_versions_reloaded_from_storage(svc, tmp_path):
    sock = _start_and_load(svc, tmp_path)
    # an fd the state file does not know about
    extra = os.memfd_create("stranger")
    svc.put("hw/ghost@v9/0/0", extra)
    os.close(extra)
    svc.start(_daemon_cmd(sock))
    svc.wait_for("READY", "1")
    st = _as_daemon(svc, sock).wait_status(lambda s: s["versions"] and s["versions"][0]["state"] == "READY")
    assert [(v["name"], v["version"]) for v in st["versions"]] == [("m", "v1")]  # read from storage again
    assert st["restored"] is False
    assert "disagrees" in st["restore_note"] and "hw/ghost@v9/0/0" in st["restore_note"]
    assert "reloading 1 version(s) from storage" in st["restore_note"]
    assert svc.stop() == 0


def test_without_a_service_manager_restart_reloads_from_storage_and_says_so(sockdir, tmp_path):
    sock = str(sockdir / "plain.sock")
    ckpt = write_model(tmp_path / "m.safetensors")
    with start_daemon(sock) as d:
        d.cli("load", "m", str(ckpt), "--version", "v1", "--alias", "prod", check=True)
        assert d.stop() == 0, d.logs()
    d = start_daemon(sock)
    try:
        st = d.wait_status(lambda s: s["versions"])
        assert [(v["name"], v["version"], v["state"]) for v in st["versions"]] == [("m", "v1", "READY")]
        assert st["aliases"][0]["alias"] == "prod"
        assert st["restored"] is False and "reloading 1 version(s) from storage" in st["restore_note"]
    finally:
        assert d.stop() == 0


def test_the_reload_log_names_only_the_versions_it_reloads(sockdir, tmp_path):
    """A retired version (the previous of a swap) is not reloaded: the log must not list it as reloaded."""
    sock = str(sockdir / "plain.sock")
    a, b = write_model(tmp_path / "a.safetensors", seed=1), write_model(tmp_path / "b.safetensors", seed=2)
    with start_daemon(sock) as d:
        d.cli("load", "m", str(a), "--version", "v1", "--alias", "prod", check=True)
        d.cli("load", "m", str(b), "--version", "v2", check=True)
        d.cli("swap", "prod", "m@v2", check=True)  # m@v1 kept for a rollback: retired
        assert d.stop() == 0, d.logs()
    d = start_daemon(sock, log=str(sockdir / "second.log"))
    try:
        st = d.wait_status(lambda s: s["versions"])
        assert [v["version"] for v in st["versions"]] == ["v2"]
        logged = [json.loads(line) for line in d.logs().splitlines() if line.startswith("{")]
        events = {e["event"]: e for e in logged if e.get("event", "").startswith("restore.")}
        assert events["restore.retired_not_reloaded"]["versions"] == ["m@v1"]
        assert events["restore.reload_from_storage"]["versions"] == ["m@v2"]
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("fdstore_max", [0, 4096], ids=["no-fdstore", "fdstore"])
def test_a_service_manager_without_an_fd_store_is_warned_of_at_start(fdstore_max):
    """systemd before 254 sets no $FDSTORE: the daemon says at start that a restart will read storage."""
    d = short_tmpdir()
    with ServiceManager(d, fdstore_max=fdstore_max) as svc:
        svc.start(_daemon_cmd(str(Path(d) / "hw.sock")))
        ready = svc.wait_for("READY", "1")
        assert svc.stop() == 0
        warned = [json.loads(line) for line in svc.output().splitlines() if "systemd.no_fdstore" in line]
        if fdstore_max:
            assert not warned and "no fd store" not in ready.fields["STATUS"]
        else:
            assert warned[0]["level"] == "warning" and "reloads every version from storage" in warned[0]["note"]
            assert ready.fields["STATUS"].endswith("; no fd store: a restart reloads from storage"), ready.fields
    shutil.rmtree(d, ignore_errors=True)


def test_notify_ready_stopping_and_watchdog(tmp_path):
    d = short_tmpdir()
    with ServiceManager(d, watchdog_usec=400_000) as svc:
        sock = str(Path(d) / "hw.sock")
        svc.start(_daemon_cmd(sock))
        svc.wait_for("READY", "1")
        svc.wait_for("WATCHDOG", "1")
        assert svc.stop() == 0
        assert any(m.fields.get("STOPPING") == "1" for m in svc.messages)
    shutil.rmtree(d, ignore_errors=True)
