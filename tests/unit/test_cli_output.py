"""The command line's surface without a daemon: JSON numbers, help text, --version, completion, and
the messages that say why a daemon cannot be reached (the socket probes faked here; the real
sockets are in tests/integration/test_cli_daemon.py)."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from hotweights.cli import app, message_dict
from hotweights.reach import DEFAULT_ORIGIN, diagnose_unreachable, resolve_socket
from hotweights.wire.pb import pb
from support.daemons import run_cli

DATA_COMMANDS = [
    "load",
    "swap",
    "alias",
    "rollback",
    "unload",
    "list",
    "status",
    "version",
    "doctor",
    "plan",
    "shard",
    "verify",
]


def test_message_dict_keeps_64_bit_integers_numbers():
    st = pb.StatusResponse(
        daemon_version="0.1.0",
        pid=7,
        resident_bytes=2**40 + 3,
        uptime_seconds=1.5,
        devices=[pb.DeviceInfo(index=0, name="H200", total_bytes=150_000_000_000, free_bytes=0)],
        versions=[pb.ModelVersionInfo(name="m", version="v1", state=pb.READY, bytes=248_064_000)],
    )
    doc = message_dict(st)
    assert doc["resident_bytes"] == 2**40 + 3 and doc["pid"] == 7 and doc["uptime_seconds"] == 1.5
    assert doc["devices"][0] == {
        "index": 0,
        "name": "H200",
        "total_bytes": 150_000_000_000,
        "free_bytes": 0,
        "resident_bytes": 0,
        "reserve_bytes": 0,
    }
    assert doc["versions"][0]["bytes"] == 248_064_000 and doc["versions"][0]["state"] == "READY"
    assert doc["restored"] is False and doc["leases"] == []
    assert json.loads(json.dumps(doc)) == doc


def test_message_dict_leaves_unset_messages_out_and_encodes_bytes():
    ev = pb.LoadEvent(progress=pb.LoadProgress(bytes_done=5, bytes_total=10))
    assert message_dict(ev) == {"progress": {"bytes_done": 5, "bytes_total": 10, "phase": ""}}
    alloc = pb.AllocationInfo(index=1, size=2**21, handle_type=pb.CUDA_IPC, ipc_handle=b"\x00\xff")
    doc = message_dict(alloc)
    assert doc["ipc_handle"] == "AP8=" and doc["handle_type"] == "CUDA_IPC" and doc["size"] == 2**21


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env, prog_name="hotweights")


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_flags_read_naturally_in_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output
    assert "--json" in r.output  # every data command has --json
    json_line = next(line for line in r.output.splitlines() if line.strip().startswith("--json"))
    assert json_line.split()[1] != "<bool>"


def test_a_value_after_a_flag_is_refused():
    r = invoke("list", "--json", "true")
    assert r.exit_code == 2 and "unexpected extra argument" in r.output.lower()


def test_version_without_a_daemon(tmp_path):
    sock = str(tmp_path / "none.sock")
    r = invoke("--version", env={"HOTWEIGHTS_SOCKET": sock})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "hotweights 0.1.0 (protocol hotweights.v1)"
    assert lines[1] == f"daemon: not reachable at {sock}"
    assert lines[2].startswith("cuda driver: ")
    r = invoke("version", "--json", "--socket", sock)
    doc = json.loads(r.stdout)
    assert doc["protocol"] == "hotweights.v1" and doc["hotweights"] == "0.1.0"
    assert doc["daemon"]["reachable"] is False and doc["daemon"]["socket"] == sock
    assert "no hotweights daemon socket" in doc["daemon"]["error"]


def test_completion_script_and_completions():
    # typer's switch for naming the shell instead of detecting the parent process's
    r = run_cli("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert r.returncode == 0, r.stderr
    assert "complete -o default -F _hotweights_completion hotweights" in r.stdout
    # what bash asks of the script: the commands that start with "st", then a command's options
    r = run_cli(_HOTWEIGHTS_COMPLETE="complete_bash", COMP_WORDS="hotweights st", COMP_CWORD="1")
    assert r.stdout.split() == ["status"]
    r = run_cli(_HOTWEIGHTS_COMPLETE="complete_bash", COMP_WORDS="hotweights unload --", COMP_CWORD="2")
    assert {"--json", "--force", "--socket"} <= set(r.stdout.split())


# ---- why a daemon cannot be reached, with the probes faked -----------------------------------------


def fake_stat(entries: dict[str, tuple[int, int, int] | type[OSError]]):
    """stat() over a table: path -> (mode, uid, gid), or an OSError class to raise."""

    def stat_(path: str) -> os.stat_result:
        entry = entries.get(path, FileNotFoundError)
        if isinstance(entry, type):
            raise entry(errno.ENOENT if entry is FileNotFoundError else errno.EACCES, os.strerror(errno.EACCES), path)
        mode, uid, gid = entry
        return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))

    return stat_


def refuse(exc: type[OSError]):
    def connect(path: str) -> None:
        raise exc(errno.ECONNREFUSED if exc is ConnectionRefusedError else errno.EACCES, "no", path)

    return connect


SOCK = "/run/hotweights/hotweights.sock"
SOCKET_0660 = (stat.S_IFSOCK | 0o660, 0, 0)
DIR_0750 = (stat.S_IFDIR | 0o750, 0, 0)


def diagnose(entries, connect=lambda p: None, groups=frozenset({100})):
    return diagnose_unreachable(
        SOCK,
        "--socket",
        "connect failed",
        stat=fake_stat(entries),
        connect=connect,
        user=lambda: ("alice", set(groups)),
    )


def test_no_socket_file_says_not_running_or_wrong_path():
    err = diagnose({"/run/hotweights": DIR_0750})
    assert err.details["reason"] == "not_found"
    assert f"no hotweights daemon socket at {SOCK} (from --socket)" in str(err)
    assert "not running, or it listens on another path" in str(err) and "--socket or HOTWEIGHTS_SOCKET" in str(err)
    err = diagnose({})
    assert "/run/hotweights does not exist either" in str(err)


def test_a_socket_nobody_listens_on_is_stale():
    err = diagnose({SOCK: SOCKET_0660}, connect=refuse(ConnectionRefusedError))
    assert err.details["reason"] == "refused"
    assert "the socket file is stale" in str(err) and "systemctl start hotweights" in err.details["fix"]


def test_permission_denied_names_the_group_and_mode():
    err = diagnose({SOCK: SOCKET_0660}, connect=refuse(PermissionError))
    assert err.details["reason"] == "permission" and err.details["group"] == "root"
    assert f"{SOCK} is mode 0660, owner root, group root, and user alice is not in group root" in str(err)
    # never "join group root": the fix is the unit's group, or a group of the socket directory's own
    assert "usermod -aG root" not in str(err) and "do not add alice to group root" in err.details["fix"]
    assert "sudo chgrp GROUP /run/hotweights && sudo chmod g+s /run/hotweights" in err.details["fix"]
    assert "`sudo usermod -aG hotweights alice`" in err.details["fix"]
    # a group other than root's is the one to join
    err = diagnose({SOCK: (stat.S_IFSOCK | 0o660, 0, 4242)}, connect=refuse(PermissionError))
    assert err.details["fix"].startswith(f"`sudo usermod -aG {err.details['group']} alice`"), err.details


def test_permission_denied_in_the_group_but_without_group_access():
    err = diagnose({SOCK: (stat.S_IFSOCK | 0o600, 0, 0)}, connect=refuse(PermissionError), groups={0})
    assert "which gives its group no access" in str(err) and "chmod g+rw" in err.details["fix"]
    err = diagnose({SOCK: SOCKET_0660}, connect=refuse(PermissionError), groups={0})
    assert "user alice is in that group" in str(err) and "log in again" in err.details["fix"]


def test_a_directory_on_the_way_that_we_cannot_enter():
    err = diagnose({SOCK: PermissionError, "/run/hotweights": DIR_0750, "/run": (stat.S_IFDIR | 0o755, 0, 0)})
    assert err.details["reason"] == "permission"
    assert "/run/hotweights is mode 0750, owner root, group root, and user alice is not in group root" in str(err)
    assert "usermod -aG root" not in str(err) and "sudo chgrp GROUP /run/hotweights " in err.details["fix"]


def test_not_a_socket_and_a_listener_that_does_not_answer():
    err = diagnose({SOCK: (stat.S_IFREG | 0o644, 0, 0)})
    assert err.details["reason"] == "not_socket" and "is not a socket" in str(err)
    err = diagnose({SOCK: SOCKET_0660})
    assert err.details["reason"] == "no_answer" and "connect failed" in str(err)


def test_where_the_socket_path_came_from(monkeypatch):
    monkeypatch.setenv("HOTWEIGHTS_SOCKET", "/x/env.sock")
    assert resolve_socket("/x/flag.sock", "--socket") == ("/x/flag.sock", "--socket")
    assert resolve_socket(None) == ("/x/env.sock", "HOTWEIGHTS_SOCKET")
    monkeypatch.delenv("HOTWEIGHTS_SOCKET")
    assert resolve_socket(None)[1] == DEFAULT_ORIGIN
