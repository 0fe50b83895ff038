"""The operator's commands against a real daemon: --json with numbers as numbers on every data
command, watch of an unknown name, and the three ways a daemon cannot be reached, each on a real
socket (none, a stale one, one we may not open)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import hotweights
from hotweights import errors
from hotweights.testing import WAIT_TIMEOUT
from support.ckpt_tools import write_model
from support.daemons import run_cli, run_client, start_daemon, wait_until


def as_json(r: subprocess.CompletedProcess):
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def test_every_data_command_prints_numbers_as_numbers(daemon, tmp_path):
    v1, v2 = write_model(tmp_path / "v1.safetensors"), write_model(tmp_path / "v2.safetensors", seed=1)
    loaded = as_json(daemon.cli("load", "m", str(v1), "--version", "v1", "--json"))
    assert loaded["state"] == "READY" and loaded["allocation"] == "ALLOCATION_FD"
    assert is_int(loaded["bytes"]) and loaded["bytes"] > 4_000_000
    assert is_int(loaded["ranks"][0]["bytes"]) and is_int(loaded["ranks"][0]["tensors"])
    assert isinstance(loaded["load_seconds"], float)
    as_json(daemon.cli("load", "m", str(v2), "--version", "v2", "--json"))

    assert as_json(daemon.cli("alias", "prod", "m@v1", "--create", "--json")) == {
        "alias": "prod",
        "name": "m",
        "version": "v1",
        "removed": False,
    }
    listed = as_json(daemon.cli("list", "--json"))
    assert {v["version"] for v in listed["versions"]} == {"v1", "v2"}
    assert all(is_int(v["bytes"]) and is_int(v["leases"]) for v in listed["versions"])
    assert listed["aliases"] == [{"alias": "prod", "name": "m", "version": "v1"}]

    st = as_json(daemon.cli("status", "--json"))
    assert st["pid"] == daemon.pid and st["backend"] == "cpu"
    assert is_int(st["resident_bytes"]) and st["resident_bytes"] >= 2 * loaded["bytes"]
    assert all(is_int(d["total_bytes"]) and is_int(d["free_bytes"]) for d in st["devices"])

    watcher = subprocess.Popen(
        [sys.executable, "-m", "hotweights", "watch", "prod", "--count", "1", "--socket", daemon.socket],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The watch subscribes some time after it starts: move the alias until it has seen a move.
        deadline = time.monotonic() + 30
        target = "v1"
        while watcher.poll() is None and time.monotonic() < deadline:
            as_json(daemon.cli("alias", "prod", f"m@{target}", "--json"))
            target = "v2" if target == "v1" else "v1"
            try:
                watcher.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        out, err = watcher.communicate(timeout=WAIT_TIMEOUT)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    ev = json.loads(out.splitlines()[0])
    assert ev["kind"] == "ALIAS_MOVED" and ev["alias"] == "prod"
    assert is_int(ev["seq"]) and ev["seq"] > 0 and isinstance(ev["time_unix"], float)

    as_json(daemon.cli("alias", "prod", "m@v1", "--json"))
    swapped = as_json(daemon.cli("swap", "prod", "m@v2", "--no-keep-previous", "--json"))  # v1: no lease, freed
    assert swapped["version"] == "v2" and is_int(swapped["bytes"]) and "prod" in swapped["aliases"]
    assert as_json(daemon.cli("alias", "prod", "--remove", "--json"))["removed"] is True
    freed = as_json(daemon.cli("unload", "m@v2", "--json"))
    assert freed["unloaded"] == ["m@v2"] and is_int(freed["bytes_freed"]) and freed["bytes_freed"] >= loaded["bytes"]

    version = as_json(daemon.cli("version", "--json"))
    assert version["daemon"]["reachable"] is True and version["daemon"]["pid"] == daemon.pid
    r = run_cli("--version", HOTWEIGHTS_SOCKET=daemon.socket)
    assert r.returncode == 0 and f"daemon: hotweightsd 0.1.0, backend cpu, pid {daemon.pid}" in r.stdout

    checks = {c["name"]: c for c in json.loads(daemon.cli("doctor", "--json").stdout)}
    assert checks["daemon"]["status"] == "ok" and f"pid {daemon.pid}" in checks["daemon"]["detail"]


def test_watch_of_an_unknown_name_is_an_error(daemon, tmp_path):
    daemon.cli(
        "load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", "--alias", "prod", check=True
    )
    r = daemon.cli("watch", "nosuch", timeout=30)
    assert r.returncode == 1
    assert "no alias or model named 'nosuch' to watch (aliases: prod; models: m)" in r.stderr


def test_no_socket_file_says_not_running_or_wrong_path(sockdir):
    missing = str(sockdir / "none.sock")
    r = run_cli("list", "--socket", missing)
    assert r.returncode == 1
    assert f"no hotweights daemon socket at {missing} (from --socket)" in r.stderr
    assert "not running, or it listens on another path" in r.stderr
    r = run_cli("status", HOTWEIGHTS_SOCKET=missing)
    assert r.returncode == 1 and f"{missing} (from HOTWEIGHTS_SOCKET)" in r.stderr


def test_a_stale_socket_says_the_daemon_is_down(sockdir):
    d = start_daemon(str(sockdir / "stale.sock"))
    d.proc.send_signal(signal.SIGKILL)  # no chance to remove its socket file
    d.proc.wait(timeout=WAIT_TIMEOUT)
    assert os.path.exists(d.socket)
    r = run_cli("list", "--socket", d.socket)
    assert r.returncode == 1
    assert f"nothing listens on {d.socket} (from --socket): the socket file is stale" in r.stderr
    assert "systemctl start hotweights" in r.stderr
    r = run_cli("doctor", "--socket", d.socket, "--json")
    assert r.returncode == 1
    daemon_check = next(c for c in json.loads(r.stdout) if c["name"] == "daemon")
    assert daemon_check["status"] == "fail" and "stale" in daemon_check["detail"] and daemon_check["fix"]


# The client runs as nobody in a child process: root ignores file modes. It switches user after its
# imports, because this machine's interpreter and standard library live where nobody may not read.
AS_NOBODY = """
import os, sys
from hotweights.cli import main
main(["list", "--socket", sys.argv[1] + ".absent"])  # the failing path's lazy imports, done as root
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(main(["list", "--socket", sys.argv[1]]))
"""


def test_permission_denied_names_the_socket_group_and_mode(daemon, sockdir):
    if os.geteuid() == 0:
        os.chmod(sockdir, 0o755)  # the directory lets anyone through: the socket's own mode decides
        r = run_client(AS_NOBODY, daemon.socket, check=False)
        assert r.returncode == 1, r.stderr
        assert (
            f"permission denied on {daemon.socket} (from --socket): {daemon.socket} is mode 0660, owner root, "
            f"group root, and user nobody is not in group root" in r.stderr
        ), r.stderr
        assert "usermod -aG root" not in r.stderr and "do not add nobody to group root" in r.stderr, r.stderr
    else:
        os.chmod(daemon.socket, 0)
        try:
            r = run_cli("list", "--socket", daemon.socket)
        finally:
            os.chmod(daemon.socket, 0o660)
        assert r.returncode == 1 and f"permission denied on {daemon.socket}" in r.stderr
        assert "gives its group no access" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_a_directory_the_user_may_not_enter(daemon, sockdir):
    os.chmod(sockdir, 0o700)
    r = run_client(AS_NOBODY, daemon.socket, check=False)
    assert r.returncode == 1
    assert f"{sockdir} is mode 0700, owner root, group root, which gives its group no access" in r.stderr, r.stderr


def test_load_again_is_idempotent_and_other_content_is_refused(daemon, tmp_path):
    """A provisioning script run twice: the second load of the same content succeeds without reading;
    the same version from other content is a ContentMismatch naming the loaded version."""
    ckpt = write_model(tmp_path / "m.safetensors")
    first = daemon.cli("load", "m", str(ckpt), "--version", "v1", "--alias", "prod")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "loaded m@v1" in first.stdout
    resident = daemon.status()["resident_bytes"]

    again = daemon.cli("load", "m", str(ckpt), "--version", "v1", "--alias", "prod")
    assert again.returncode == 0, again.stderr + again.stdout
    assert "m@v1 already loaded, same content (READY, alias prod); nothing read" in again.stdout
    as_json_again = as_json(daemon.cli("load", "m", str(ckpt), "--version", "v1", "--json"))
    assert as_json_again["already_loaded"] is True and as_json_again["state"] == "READY"
    st = daemon.status()
    assert [(v["name"], v["version"]) for v in st["versions"]] == [("m", "v1")]
    assert st["resident_bytes"] == resident
    wait_until(lambda: "load.already_loaded" in daemon.logs(), what="the daemon to log the repeated load")

    # without --version the version is the files' fingerprint: the same checkpoint is the same version
    auto = as_json(daemon.cli("load", "n", str(ckpt), "--json"))
    assert auto["already_loaded"] is False
    auto_again = as_json(daemon.cli("load", "n", str(ckpt), "--json"))
    assert auto_again["already_loaded"] is True and auto_again["version"] == auto["version"]

    other = write_model(tmp_path / "other.safetensors", seed=1)
    r = daemon.cli("load", "m", str(other), "--version", "v1")
    assert r.returncode == 1, r.stderr + r.stdout
    assert "m@v1 is already loaded (READY) from" in r.stderr and "with different content" in r.stderr, r.stderr
    assert f"files only in the new checkpoint: {other}" in r.stderr, r.stderr
    with hotweights.connect(daemon.socket) as c, pytest.raises(errors.ContentMismatch) as exc:
        c.load("m", other, version="v1")
    assert exc.value.details["ref"] == "m@v1" and exc.value.details["source"] == str(ckpt)
    st = daemon.status()
    assert sorted(v["name"] for v in st["versions"]) == ["m", "n"]
    assert [v["source"] for v in st["versions"] if v["name"] == "m"] == [str(ckpt)]


def test_retrained_weights_of_the_same_shapes_load_as_another_version_by_default(daemon, tmp_path):
    """A weight update loaded by path without --version: another version, not a ContentMismatch."""
    first = write_model(tmp_path / "a" / "m.safetensors", seed=0)
    update = write_model(tmp_path / "b" / "m.safetensors", seed=1)  # the same tensors and shapes
    assert first.stat().st_size == update.stat().st_size
    a = as_json(daemon.cli("load", "m", str(first.parent), "--json"))
    b = as_json(daemon.cli("load", "m", str(update.parent), "--json"))
    assert a["version"] != b["version"] and b["already_loaded"] is False
    swapped = daemon.cli("swap", "prod", str(first.parent), "--create", "--name", "m")
    assert swapped.returncode == 0 and f"m@{a['version']}" in swapped.stdout, swapped.stderr + swapped.stdout
    assert sorted(v["version"] for v in daemon.status()["versions"]) == sorted([a["version"], b["version"]])


def test_a_daemon_wide_full_verify_says_how_to_load_a_plain_checkpoint(sockdir, tmp_path):
    ckpt = write_model(tmp_path / "plain.safetensors")  # no hotweights.json beside it
    with start_daemon(str(sockdir / "v.sock"), "--verify", "full") as d:
        r = d.cli("load", "m", str(ckpt), "--version", "v1")
        assert r.returncode == 1, r.stdout
        assert 'verify=full (from the daemon\'s verify = "full") needs a hotweights.json manifest' in r.stderr
        assert "Load it with --verify fast or none" in r.stderr and "hotweights shard" in r.stderr, r.stderr
        d.cli("load", "m", str(ckpt), "--version", "v1", "--verify", "fast", check=True)


def test_a_swap_to_a_resident_version_says_nothing_was_read(daemon, tmp_path):
    a, b = write_model(tmp_path / "a.safetensors", seed=1), write_model(tmp_path / "b.safetensors", seed=2)
    daemon.cli("load", "m", str(a), "--version", "v1", "--alias", "prod", check=True)
    daemon.cli("load", "m", str(b), "--version", "v2", check=True)
    r = daemon.cli("swap", "prod", "m@v2", check=True)
    assert r.stdout.splitlines()[0] == "prod -> m@v2 (resident; nothing read)", r.stdout
    assert "GB/s" not in r.stdout
    info = as_json(daemon.cli("swap", "prod", "m@v1", "--json"))
    assert info["already_loaded"] is True and info["version"] == "v1"
    # a path target is read: its figures stand
    c = write_model(tmp_path / "c.safetensors", seed=3)
    info = as_json(daemon.cli("swap", "prod", str(c), "--version", "v3", "--json"))
    assert info["already_loaded"] is False and info["version"] == "v3"
    # a path whose version is resident already (same content: m@v1, kept for a rollback) reads nothing either
    r = daemon.cli("swap", "prod", str(a), "--version", "v1", check=True)
    assert r.stdout.splitlines()[0] == "prod -> m@v1 (resident; nothing read)", r.stdout
    assert "GB/s" not in r.stdout
    info = as_json(daemon.cli("swap", "prod", str(c), "--version", "v3", "--json"))
    assert info["already_loaded"] is True and info["version"] == "v3"
