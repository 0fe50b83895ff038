"""The daemon as the shipped unit runs it: user hotweights, no capabilities, no new privileges, a
read-only system, a private /tmp, /run and network, the unit's umask and limits, the example config
(tests/support/unit_sandbox.py says what is emulated and what needs systemd itself). It starts, a
client of another user loads and attaches through the unit's socket, and it stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from support import unit_sandbox
from support.ckpt_tools import write_model
from support.daemons import run_client, short_tmpdir

pytestmark = pytest.mark.skipif(unit_sandbox.missing_tools() is not None, reason=str(unit_sandbox.missing_tools()))


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_the_daemon_runs_as_the_unit_says(tmp_path):
    models = tmp_path / "models"
    models.mkdir(mode=0o755)
    models.chmod(0o755)
    ckpt = write_model(models / "mixed.safetensors")
    ckpt.chmod(0o644)
    runtime = Path(short_tmpdir())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    daemon, account, settings = unit_sandbox.start(scratch, runtime, models, log=tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        st = proc_status(daemon.pid)
        assert st["Uid"].split() == [str(account.uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(account.gid)] * 4, st["Gid"]
        assert st["NoNewPrivs"] == "1" and int(st["CapBnd"], 16) == 0 and int(st["CapEff"], 16) == 0, st
        for ns in ("net", "mnt"):
            assert os.readlink(f"/proc/{daemon.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        root = [ln.split() for ln in Path(f"/proc/{daemon.pid}/mountinfo").read_text().splitlines()]
        assert any(f[4] == "/" and "ro" in f[5].split(",") for f in root), "the daemon's / is writable"
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        assert f"Max open files            {unit_sandbox.limit(settings, 'LimitNOFILE')}" in limits, limits

        # The socket: the unit's group may connect, others may not (the daemon's 0660 under UMask=0007).
        sock = os.stat(daemon.socket)
        assert sock.st_uid == account.uid and sock.st_gid == account.gid
        assert stat.S_IMODE(sock.st_mode) == 0o660, oct(sock.st_mode)

        # A client process (root, so it may use either socket) loads from the models folder as the
        # daemon sees it and attaches bit-exact, zero copy.
        inside = f"{unit_sandbox.MODELS_INSIDE}/{ckpt.name}"
        r = run_client("attach_and_compare", daemon.socket, inside, str(ckpt))
        assert r.stdout.startswith("OK"), r.stdout + r.stderr

        assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)
        print(daemon.logs()[-3000:])
