"""A lease's handles go to its holder only: a real daemon, the holder and the intruders in processes
of their own (tests/clients/hold_with_ticket.py, tests/clients/intrude.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from hotweights.testing import CLI_TIMEOUT, read_line
from support import CLIENTS
from support.ckpt_tools import write_model
from support.daemons import run_client, spawn_client


def _holder(daemon, tmp_path):
    daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
    holder = spawn_client("hold_with_ticket", daemon.socket, "m")
    line = read_line(holder, what="the holder's next line")
    assert line.startswith("{"), line
    return holder, json.loads(line)


def _lease_record(daemon) -> dict:
    [lease] = daemon.status()["leases"]
    return lease


def _fetch(holder) -> str:
    holder.stdin.write("fetch\n")
    holder.stdin.flush()
    return read_line(holder, what="the holder's next line").strip()


def test_another_process_of_the_same_uid_gets_neither_handles_nor_fds(daemon, tmp_path):
    holder, got = _holder(daemon, tmp_path)
    before = _lease_record(daemon)
    assert before["pid"] == holder.pid

    r = run_client("intrude", daemon.socket, got["lease_id"], got["ticket"], got["fd_socket"])
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["handles"].startswith("PermissionDenied: "), seen
    assert seen["handles_guessed_key"].startswith("PermissionDenied: "), seen
    assert seen["fds"].startswith("PermissionDenied: "), seen
    assert _lease_record(daemon) == before  # still the holder's: nothing rewritten

    # The refused attempt did not spend the holder's ticket; its own fetch records its uid.
    assert _fetch(holder) == "fetched 1"
    after = _lease_record(daemon)
    assert (after["pid"], after["uid"]) == (holder.pid, os.getuid())
    holder.stdin.close()
    assert holder.wait(30) == 0
    assert "fdchannel.denied" in daemon.logs()


@pytest.fixture
def other_user():
    """A throwaway system user, removed afterwards: (uid, gid)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it creates a user and drops to it")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"hw-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
        check=True,
        capture_output=True,
        timeout=CLI_TIMEOUT,
    )
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=CLI_TIMEOUT)


def _as_user(uid: int, gid: int, fn) -> str:
    """``fn()`` in a forked child that has dropped to (uid, gid) with no supplementary groups; its
    result, a string, comes back through a pipe. Everything it runs is imported before the fork: the
    venv's interpreter may not be readable by that user."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = fn()
            os.write(w, out.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_a_process_of_another_uid_cannot_redeem_the_holders_ticket(daemon, tmp_path, other_user):
    import importlib.util

    spec = importlib.util.spec_from_file_location("intrude", CLIENTS / "intrude.py")
    assert spec is not None and spec.loader is not None
    intrude = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(intrude)

    holder, got = _holder(daemon, tmp_path)
    before = _lease_record(daemon)
    # let the other user reach the socket (its folder is the test's, mode 0700): the ticket is what is tested
    os.chmod(os.path.dirname(got["fd_socket"]), 0o711)
    os.chmod(got["fd_socket"], 0o666)
    uid, gid = other_user
    seen = _as_user(uid, gid, lambda: intrude.steal_fds(got["fd_socket"], got["ticket"]))
    assert seen.startswith("PermissionDenied: "), seen
    assert f"uid {uid}" in seen
    assert _lease_record(daemon) == before
    assert _fetch(holder) == "fetched 1"
    holder.stdin.close()
    assert holder.wait(30) == 0
