"""A daemon restored from a state file an older daemon wrote: its versions carry the version digest made
the older way, and loading the same files again is still the same content (no second copy, no refusal)."""

from __future__ import annotations

from hotweightsd.persist import statefile
from hotweightsd.persist.fdstore import state_path
from support.ckpt_tools import write_model
from support.daemons import Daemon, serve_command, wait_until
from support.svcmgr import ServiceManager


def _as_daemon(svc: ServiceManager, sock: str) -> Daemon:
    return Daemon(sock, svc.process, svc.log_path).wait_ready()


def _as_written_by_an_older_daemon(path) -> None:
    """Every version's content as the daemon before the digest scheme was recorded wrote it: no scheme,
    and a digest of another kind."""
    doc = statefile.load(path)
    found = 0

    def walk(node) -> None:
        nonlocal found
        if isinstance(node, dict):
            if "fingerprint" in node and "files" in node:
                node.pop("scheme", None)
                node["fingerprint"] = "0123456789ab"
                found += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert found, "the state file records each version's content"
    statefile.save(path, doc)


def test_loading_the_same_files_again_after_an_upgrade_is_the_same_version(svc, tmp_path):
    sock = str(svc.tmpdir / "hw.sock")
    cmd = serve_command(sock, config="none")
    svc.start(cmd)
    svc.wait_for("READY", "1")
    ckpt = str(write_model(tmp_path / "m" / "m.safetensors", seed=1))
    _as_daemon(svc, sock).cli("load", "llama", ckpt, "--version", "v1", "--alias", "prod", check=True)
    wait_until(lambda: "hw/llama@v1/0/0" in svc.stored_fds, what="the fd store to hold llama@v1")
    wait_until(lambda: state_path(sock).exists(), what="the state file")
    assert svc.stop() == 0
    _as_written_by_an_older_daemon(state_path(sock))

    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = _as_daemon(svc, sock)
    st = d.status()
    assert st["restored"] is True, st["restore_note"]
    again = d.cli("load", "llama", ckpt, "--version", "v1")
    assert again.returncode == 0, again.stderr
    d.cli("load", "other", ckpt, "--version", "v1", check=True)  # another name, the same files: shared
    st = d.status()
    assert {(v["name"], v["version"]) for v in st["versions"]} == {("llama", "v1"), ("other", "v1")}
    shares = {v["name"]: v["shares_memory_with"] for v in st["versions"]}
    assert shares == {"llama": "", "other": "llama@v1"}, shares
    assert svc.stop() == 0
