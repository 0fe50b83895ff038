"""Roles by socket, on a real daemon: the readers' socket refuses load, unload, swap and alias with a
typed PERMISSION_DENIED (``OperatorRequired``) that names the operator socket; the operator socket
(``<socket>.admin``, 0600, or 0660 for ``operator_group``) takes them; and a real unprivileged user in
the readers' group lists and reads status but can neither change anything nor open the operator socket.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import hotweights
from hotweights import errors
from hotweights.testing import CLI_TIMEOUT, child_env
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import CLASS_KEY, DETAILS_KEY
from support.ckpt_tools import write_model
from support.daemons import client_json, serve_command, short_tmpdir, start_daemon

TIMEOUT = 60.0


def _operator_requests(model: str) -> dict[str, object]:
    return {
        "LoadModel": pb.LoadModelRequest(name="n", path=model, wait=True),
        "UnloadModel": pb.UnloadModelRequest(ref="m@v1", force=True),
        "SwapModel": pb.SwapModelRequest(alias="prod", target=model, name="n", create=True),
        "SetAlias": pb.SetAliasRequest(alias="other", target="m@v1", create=True),
    }


def _invoke(stub: pb_grpc.HotweightsStub, rpc: str, request: object) -> object:
    answer = getattr(stub, rpc)(request, timeout=TIMEOUT)
    return list(answer) if rpc in ("LoadModel", "SwapModel") else answer


@pytest.fixture
def loaded(sockdir) -> Iterator[tuple[hotweights.testing.Daemon, str]]:
    """A daemon on sockdir/hw.sock with m@v1 loaded and alias prod on it; the model's path."""
    model = str(write_model(sockdir / "m" / "m.safetensors"))
    with start_daemon(str(sockdir / "hw.sock")) as d:
        with d.connect() as c:
            c.load("m", model, version="v1", alias="prod")
        yield d, model


def _state(d: hotweights.testing.Daemon) -> tuple[set[str], dict[str, str]]:
    with d.connect() as c:
        listed = c.list()
    return {f"{v.name}@{v.version}" for v in listed.versions}, {
        a.alias: f"{a.name}@{a.version}" for a in listed.aliases
    }


@pytest.mark.parametrize("rpc", ["LoadModel", "UnloadModel", "SwapModel", "SetAlias"])
def test_the_readers_socket_refuses_operator_rpcs(loaded, rpc):
    d, model = loaded
    before = _state(d)
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _invoke(pb_grpc.HotweightsStub(channel), rpc, _operator_requests(model)[rpc])
    err = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    meta = dict(err.trailing_metadata())
    assert meta[CLASS_KEY] == "OperatorRequired", meta
    assert f'"operator_socket": "{d.operator_socket}"' in meta[DETAILS_KEY]
    assert f"{rpc} needs the operator role" in err.details() and d.operator_socket in err.details()
    assert _state(d) == before and d.alive()
    assert "rpc.operator_required" in d.logs()


def test_the_operator_socket_takes_every_operator_rpc(loaded):
    d, model = loaded
    requests = _operator_requests(model)
    with grpc.insecure_channel(f"unix:{d.operator_socket}") as channel:
        stub = pb_grpc.HotweightsStub(channel)
        for rpc in ("SetAlias", "LoadModel", "SwapModel", "UnloadModel"):
            _invoke(stub, rpc, requests[rpc])
        # and what a reader may do too
        assert stub.Status(pb.StatusRequest(), timeout=TIMEOUT).pid == d.pid
    versions, aliases = _state(d)
    assert "m@v1" not in versions and aliases.get("prod", "").startswith("n@"), (versions, aliases)


def test_the_client_routes_operator_calls_to_the_operator_socket(loaded, sockdir):
    d, model = loaded
    with hotweights.connect(d.socket) as c:
        assert c.operator_socket == d.operator_socket
        c.set_alias("canary", "m@v1", create=True)
        assert c.load("m", model, version="v1").already_loaded
        c.remove_alias("canary")
    # the command line too, as an operator runs it
    r = d.cli("alias", "canary", "m@v1", "--create")
    assert r.returncode == 0, r.stderr
    # a client told of no operator socket, against a daemon that has it elsewhere: the error names the path
    with hotweights.connect(d.socket, operator_socket=str(sockdir / "nowhere.admin")) as c:
        with pytest.raises(errors.Unavailable, match="nowhere.admin"):
            c.unload("m@v1")
        assert c.list().versions  # reads still go to the readers' socket


def test_the_operator_socket_is_0600_and_the_readers_0660(loaded):
    d, _ = loaded
    assert d.operator_socket == d.socket + ".admin"
    admin = os.stat(d.operator_socket)
    assert stat.S_ISSOCK(admin.st_mode) and stat.S_IMODE(admin.st_mode) == 0o600
    assert admin.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660


def test_an_operator_socket_of_its_own_path_and_group(sockdir):
    gid = os.getegid()
    other = sockdir / "ops" / "hw.ops"
    model = str(write_model(sockdir / "m.safetensors"))
    extra = ("--operator-socket", str(other), "--operator-group", str(gid))
    with start_daemon(str(sockdir / "hw.sock"), *extra) as d:
        st = os.stat(other)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid and d.operator_socket == str(other)
        assert not os.path.exists(d.socket + ".admin")
        # a client that knows only the readers' socket looks for <socket>.admin and says so
        r = d.cli("load", "m", model, "--version", "v1")
        expected = f"a daemon answers on {d.socket}, but there is no operator socket at {d.socket}.admin"
        assert r.returncode == 1 and expected in r.stderr, r.stderr
        env = child_env({"HOTWEIGHTS_OPERATOR_SOCKET": str(other)})
        r = d.cli("load", "m", model, "--version", "v1", env=env)
        assert r.returncode == 0, r.stderr
        r = d.cli("unload", "m@v1", "--operator-socket", str(other))
        assert r.returncode == 0, r.stderr
    assert not os.path.exists(other)  # removed at stop, like the readers' socket


def test_a_live_operator_socket_is_not_taken_over(loaded, sockdir):
    d, _ = loaded
    cmd = serve_command(str(sockdir / "second.sock"), "--operator-socket", d.operator_socket)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=child_env())
    assert r.returncode == 2 and f"a live process answers on {d.socket}.admin" in r.stderr, r.stderr
    with grpc.insecure_channel(f"unix:{d.operator_socket}") as channel:  # still the first daemon's
        assert pb_grpc.HotweightsStub(channel).Status(pb.StatusRequest(), timeout=TIMEOUT).pid == d.pid


def test_an_operator_group_that_does_not_exist_stops_the_start(sockdir):
    cmd = serve_command(str(sockdir / "hw.sock"), "--operator-group", "no-such-group-hw")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=child_env())
    assert r.returncode == 2, r.stderr
    assert "operator_group 'no-such-group-hw': no such group" in r.stderr
    assert not os.path.exists(sockdir / "hw.sock")


# ---- a real unprivileged user -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reader_user() -> Iterator[tuple[int, int]]:
    """A throwaway user whose only group is a throwaway readers' group: (uid, gid)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a user and runs clients as it (CI runs as root)")
    if not (shutil.which("useradd") and shutil.which("groupadd")):
        pytest.skip("useradd/groupadd are not installed")
    name = f"hwread{os.getpid()}"
    subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=CLI_TIMEOUT)
    try:
        subprocess.run(
            ["useradd", "--no-create-home", "--no-user-group", "--gid", name, "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
            timeout=CLI_TIMEOUT,
        )
        try:
            yield pwd.getpwnam(name).pw_uid, grp.getgrnam(name).gr_gid
        finally:
            subprocess.run(["userdel", name], capture_output=True, timeout=CLI_TIMEOUT)
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=CLI_TIMEOUT)


@pytest.fixture
def readers_dir(reader_user) -> Iterator[Path]:
    """A socket directory as the unit makes /run/hotweights: the readers' group may enter it (setgid,
    so the sockets the daemon creates in it belong to that group)."""
    d = Path(short_tmpdir())
    os.chown(d, 0, reader_user[1])
    os.chmod(d, 0o2750)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_real_reader_may_read_and_attach_but_change_nothing(reader_user, readers_dir):
    uid, gid = reader_user
    model = str(write_model(readers_dir / "m" / "m.safetensors"))
    os.chmod(model, 0o644)  # the reader may read the checkpoint: what stops it is its role
    with start_daemon(str(readers_dir / "hw.sock")) as d:
        with d.connect() as c:
            c.load("m", model, version="v1", alias="prod")
        before = _state(d)
        assert os.stat(d.socket).st_gid == gid and os.stat(d.operator_socket).st_gid == gid

        out = client_json("reader_attempts", d.socket, model, str(uid), str(gid))

        assert out["uid"] == uid and out["groups"] == [gid]
        raw, via_client, messages = out["raw"], out["client"], out["messages"]
        # what a serving process does is let through (a ghost lease is NotFound, not a refusal)
        assert raw["ListModels"] == raw["Status"] == raw["Health"] == "ok", out
        assert raw["Watch"] == "DEADLINE_EXCEEDED" and raw["Lease"] in ("NotFound", "DEADLINE_EXCEEDED"), out
        assert raw["GetHandles"] not in ("OperatorRequired", "Unavailable"), out
        assert raw["attach"] == "ok" and out["attached"].startswith("ok ") and out["attached"] != "ok 0", out
        assert via_client["list"] == via_client["status"] == "ok", out
        # what changes the daemon is refused on the readers' socket, typed, naming the operator socket
        for rpc in ("LoadModel", "UnloadModel", "SwapModel", "SetAlias"):
            assert raw[rpc] == "OperatorRequired", (rpc, out)
            assert f"on {d.socket}.admin" in messages[rpc]
        # and the library's operator calls cannot even open the operator socket
        assert out["connect_operator"] == "EACCES", out
        for call in ("load", "unload", "swap", "alias"):
            assert via_client[call] == "OperatorRequired", (call, out)
        user = pwd.getpwuid(uid).pw_name
        assert f"user {user} may not use the operator socket" in messages["client.load"]
        assert f"{d.socket}.admin is mode 0600, owner root" in messages["client.load"]
        assert out["cli_load"]["code"] == 1, out["cli_load"]
        assert "LoadModel needs the operator role" in out["cli_load"]["stderr"], out["cli_load"]

        assert d.alive() and _state(d) == before
        assert d.status()["pid"] == d.pid
