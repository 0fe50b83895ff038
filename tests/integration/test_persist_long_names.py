"""A version whose fd-store name systemd would refuse is still persisted (under a bounded name),
and persisting goes on for every later change: a restart serves what was loaded and aliased last."""

from __future__ import annotations

from support.ckpt_tools import write_model
from support.daemons import Daemon, serve_command, wait_until
from support.svcmgr import ServiceManager


def _as_daemon(svc: ServiceManager, sock: str) -> Daemon:
    return Daemon(sock, svc.process, svc.log_path).wait_ready()


def test_a_longest_name_and_version_is_stored_and_later_changes_survive_a_restart(svc, tmp_path):
    sock = str(svc.tmpdir / "hw.sock")
    cmd = serve_command(sock, config="none")
    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = _as_daemon(svc, sock)
    long_name, long_version = "n" * 128, "v" * 128
    d.cli(
        "load",
        "llama",
        str(write_model(tmp_path / "1" / "m.safetensors", seed=1)),
        "--version",
        "v1",
        "--alias",
        "prod",
        check=True,
    )
    d.cli(
        "load",
        long_name,
        str(write_model(tmp_path / "o" / "m.safetensors", seed=3)),
        "--version",
        long_version,
        check=True,
    )
    d.cli("load", "llama", str(write_model(tmp_path / "2" / "m.safetensors", seed=2)), "--version", "v2", check=True)
    d.cli("alias", "prod", "llama@v2", check=True)
    d.cli("unload", "llama@v1", check=True)
    wait_until(
        lambda: len(svc.stored_fds) == 2 and "hw/llama@v2/0/0" in svc.stored_fds,
        what="the fd store to hold llama@v2 and the long-named version, and no longer llama@v1",
        context=lambda: f"{sorted(svc.stored_fds)}\n{svc.output()}",
    )
    assert all(len(n) <= 255 for n in svc.stored_fds)
    assert "persist.failed" not in svc.output()

    assert svc.stop() == 0
    svc.start(cmd)
    svc.wait_for("READY", "1")
    st = _as_daemon(svc, sock).status()
    assert st["restored"] is True, st["restore_note"]
    assert {(v["name"], v["version"]) for v in st["versions"]} == {("llama", "v2"), (long_name, long_version)}
    assert {a["alias"]: a["version"] for a in st["aliases"]} == {"prod": "v2"}
    assert svc.stop() == 0
