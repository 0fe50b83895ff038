"""The restart state file belongs to one socket: two daemons in one directory keep their own.

Both daemons run without a service manager, so a restart reloads from storage what its state file
names: restoring the other daemon's models, or rewriting its file, would show here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hotweightsd.persist import statefile
from support.ckpt_tools import write_model
from support.daemons import Daemon, start_daemon, wait_until


def names(path: Path, keys: list[str]) -> None:
    """Waits until the state file at ``path`` names exactly ``keys``."""
    wait_until(lambda: keys_in(path) == keys, what=f"{path.name} to name {keys}", context=lambda: keys_in(path))


def keys_in(path: Path) -> list[str] | None:
    """The versions a state file names; None while it is absent."""
    if not path.exists():
        return None
    return sorted(f"{v['name']}@{v['version']}" for v in statefile.load(path)["versions"])


def restart(d: Daemon, *args: str) -> Daemon:
    assert d.stop() == 0, d.logs()
    return start_daemon(d.socket, *args)


def test_two_daemons_in_one_directory_neither_restore_nor_rewrite_each_others_state(sockdir, tmp_path):
    shared = ("--state-dir", str(sockdir))  # both state files in one directory, beside both sockets
    a = start_daemon(str(sockdir / "a.sock"), *shared)
    b = start_daemon(str(sockdir / "b.sock"), *shared)
    a_state, b_state = sockdir / "a.sock.state.json", sockdir / "b.sock.state.json"
    try:
        a.cli(
            "load",
            "m",
            str(write_model(tmp_path / "m.safetensors", seed=1)),
            "--version",
            "v1",
            "--alias",
            "prod",
            check=True,
        )
        names(a_state, ["m@v1"])
        assert statefile.load(a_state)["socket"] == a.socket

        b = restart(b, *shared)
        st = b.status()
        assert st["versions"] == [] and st["aliases"] == []
        assert "reloading" not in st["restore_note"]

        # B's own changes go to its own file only
        before = a_state.read_bytes()
        b.cli("load", "n", str(write_model(tmp_path / "n.safetensors", seed=2)), "--version", "v2", check=True)
        names(b_state, ["n@v2"])
        b.cli("unload", "n", check=True)
        names(b_state, [])
        assert a_state.read_bytes() == before

        a = restart(a, *shared)
        st = a.wait_status(lambda s: any(v["state"] == "READY" for v in s["versions"]))
        assert [(v["name"], v["version"], v["state"]) for v in st["versions"]] == [("m", "v1", "READY")]
        assert [(x["alias"], x["version"]) for x in st["aliases"]] == [("prod", "v1")]
        assert "reloading 1 version(s) from storage" in st["restore_note"]
    finally:
        assert a.stop() == 0, a.logs()
        assert b.stop() == 0, b.logs()


def test_a_state_file_naming_another_socket_is_neither_served_nor_overwritten(sockdir, tmp_path):
    a = start_daemon(str(sockdir / "a.sock"))
    try:
        a.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
        a_state = sockdir / "a.sock.state.json"
        names(a_state, ["m@v1"])
    finally:
        assert a.stop() == 0, a.logs()
    # B's state directory holds a file of its name that A wrote (copied, or a shared state_dir
    # where both sockets have the same file name)
    other = tmp_path / "elsewhere"
    other.mkdir()
    foreign = other / "a.sock.state.json"
    shutil.copy(a_state, foreign)
    written = foreign.read_bytes()
    (sockdir / "sub").mkdir()
    b = start_daemon(str(sockdir / "sub" / "a.sock"), "--state-dir", str(other))
    try:
        st = b.status()
        assert st["versions"] == [] and st["restored"] is False
        assert f"belongs to the daemon on {a.socket}" in st["restore_note"], st["restore_note"]
        b.cli("load", "n", str(write_model(tmp_path / "n.safetensors", seed=3)), "--version", "v1", check=True)
        b.cli("unload", "n", check=True)
        assert '"restore.refused"' in b.logs()
    finally:
        assert b.stop() == 0, b.logs()
    assert foreign.read_bytes() == written
