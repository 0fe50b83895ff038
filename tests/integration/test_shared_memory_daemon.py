"""The same files loaded under two names, against a real daemon (cpu backend) with the CLI and clients
in their own processes: resident once, listed as shared, each name usable without the other, and
still shared after a restart from the fd store."""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hotweights.testing import read_line
from support.ckpt_tools import write_model
from support.daemons import Daemon, run_client, serve_command, spawn_client, wait_until


def _json(d: Daemon, *args: str) -> dict:
    return json.loads(d.cli(*args, "--json", check=True).stdout)


def _model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "ckpt" / "model.safetensors", seed=3)


def _resident(st: dict) -> tuple[int, int, int]:
    return st["resident_bytes"], sum(d["resident_bytes"] for d in st["devices"]), st["open_allocations"]


def test_second_name_is_resident_once_and_outlives_the_first(daemon, tmp_path):
    path = _model(tmp_path)
    a = _json(daemon, "load", "a", str(path.parent), "--version", "v1")
    one = _resident(daemon.status())
    assert a["shares_memory_with"] == "" and one[0] == one[1] > 0

    b = _json(daemon, "load", "b", str(path.parent), "--version", "v1")
    assert b["state"] == "READY" and b["shares_memory_with"] == "a@v1" and b["bytes"] == a["bytes"]
    assert "nothing read" in b["load_path"]
    st = daemon.status()
    assert _resident(st) == one  # one copy, one set of allocations
    assert {v["name"]: v["shares_memory_with"] for v in st["versions"]} == {"a": "", "b": "a@v1"}
    listed = daemon.cli("list", check=True).stdout
    assert "b@v1" in listed and "shares memory with a@v1" in listed, listed
    text = daemon.cli("status", check=True).stdout
    assert "b@v1 shares memory with a@v1" in text, text

    holder = spawn_client("hold_then_compare_file", daemon.socket, "b@v1", str(path))
    try:
        assert read_line(holder, what='"attached" from the holder').strip() == "attached"
        unloaded = _json(daemon, "unload", "a")
        assert unloaded["unloaded"] == ["a@v1"] and unloaded["bytes_freed"] == 0  # b still holds it
        st = daemon.status()
        assert _resident(st) == one
        assert [(v["name"], v["shares_memory_with"]) for v in st["versions"]] == [("b", "")]  # b holds it alone
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert read_line(holder, what='"OK" from the holder').split()[0] == "OK"
        assert holder.wait(60) == 0, holder.stderr.read()
    finally:
        if holder.poll() is None:
            holder.kill()
    # a client that attaches only now gets b's memory from the daemon, after a went
    assert run_client("attach_compare_file", daemon.socket, "b@v1", str(path)).stdout.split()[0] == "OK"
    assert _json(daemon, "unload", "b")["bytes_freed"] == one[0]
    assert _resident(daemon.status()) == (0, 0, 0)


def test_two_names_loaded_at_once_are_resident_once(daemon, tmp_path):
    """Two operators load the same files under two names at the same moment: whichever reads, the other
    takes its memory (READY, or still being read: it waits for that read), so it is resident once."""
    path = _model(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(_json, daemon, "load", n, str(path.parent), "--version", "v1") for n in ("a", "b")]
        for r in runs:
            assert r.result()["state"] == "READY"
    st = daemon.status()
    shares = {v["name"]: v["shares_memory_with"] for v in st["versions"]}
    assert sorted(shares.values()) in (["", "a@v1"], ["", "b@v1"]), shares  # one read, the other shares it
    reader = next(n for n, s in shares.items() if not s)
    resident = _resident(st)
    nbytes = next(v["bytes"] for v in st["versions"] if v["name"] == reader)
    assert resident[0] == resident[1] and nbytes <= resident[0] < 2 * nbytes  # one copy, not two
    sharer = "b" if reader == "a" else "a"
    assert _json(daemon, "unload", reader)["bytes_freed"] == 0  # the other still holds the copy
    assert run_client("attach_compare_file", daemon.socket, f"{sharer}@v1", str(path)).stdout.split()[0] == "OK"
    assert _json(daemon, "unload", sharer)["bytes_freed"] == resident[0]


def test_a_restart_from_the_fd_store_keeps_both_names_resident_once(svc, tmp_path):
    sock = str(svc.tmpdir / "hw.sock")
    cmd = serve_command(sock, config="none")
    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = Daemon(sock, svc.process, svc.log_path).wait_ready()
    path = _model(tmp_path)
    kept = tmp_path / "kept.safetensors"
    shutil.copy(path, kept)  # to compare with once the checkpoint is gone
    d.cli("load", "a", str(path.parent), "--version", "v1", check=True)
    d.cli("load", "b", str(path.parent), "--version", "v1", "--alias", "prod", check=True)
    one = _resident(d.status())
    # each version's fds under its own names: the memory lives while either is stored
    wait_until(lambda: sorted(svc.stored_fds) == ["hw/a@v1/0/0", "hw/b@v1/0/0"], what="both versions' fds stored")

    svc.stop(signal.SIGKILL)
    shutil.rmtree(path.parent)  # a restart that served them must not have read storage
    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = Daemon(sock, svc.process, svc.log_path).wait_ready()
    st = d.status()
    assert st["restored"] is True, st["restore_note"]
    assert {(v["name"], v["state"], v["shares_memory_with"]) for v in st["versions"]} == {
        ("a", "READY", ""),
        ("b", "READY", "a@v1"),
    }
    assert _resident(st) == one  # still counted once
    assert {a["alias"]: a["name"] for a in st["aliases"]} == {"prod": "b"}

    d.cli("unload", "a", check=True)
    wait_until(lambda: sorted(svc.stored_fds) == ["hw/b@v1/0/0"], what="a's fds to leave the store")
    assert run_client("attach_compare_file", sock, "prod", str(kept)).stdout.split()[0] == "OK"
    assert _resident(d.status()) == one
    assert svc.stop() == 0
