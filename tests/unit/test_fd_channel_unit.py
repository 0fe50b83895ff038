"""The fd channel's limits in-process (the real FdChannel over a real unix socket, a real cpu backend)
and the client's typed errors against small fake servers."""

from __future__ import annotations

import os
import select
import shutil
import socket
import threading
from pathlib import Path

import pytest

from hotweights import errors
from hotweights.testing import WAIT_TIMEOUT
from hotweights.wire.fdproto import MAGIC, fetch_fds
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.server.fdchannel import FdChannel
from support.ckpt_tools import write_model
from support.daemons import fd_channel_answer, read_line, short_tmpdir, wait_until

DEADLINE_S = 3.0  # the channel's deadline here: a busy answer comes long before it, however loaded the machine


@pytest.fixture
def sockdir():
    d = Path(short_tmpdir())
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def channel(sockdir):
    manager = ModelManager(CpuBackend(memory_limit=64 * 2**20))
    outcomes: list[str] = []
    ch = FdChannel(
        str(sockdir / "c.fds"), manager, on_connection=outcomes.append, timeout=DEADLINE_S, max_connections=2
    )
    ch.start()
    ch.outcomes = outcomes  # type: ignore[attr-defined]
    yield ch
    ch.stop()
    manager.close()


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def test_beyond_the_connection_cap_the_answer_is_busy_at_once_and_idle_ones_are_cut(channel):
    idle = [_connect(channel.path) for _ in range(2)]
    wait_until(lambda: channel._open == 2, what="both idle connections accepted")
    extra = _connect(channel.path)
    assert fd_channel_answer(extra)["error"] == "FdChannelBusy"
    with pytest.raises(errors.FdChannelBusy):
        fetch_fds(channel.path, "0" * 32, 1, timeout=0.2)  # retried until its own timeout
    for s in idle:
        assert fd_channel_answer(s)["error"] == "DeadlineExceeded"
    wait_until(lambda: channel.outcomes.count("timeout") == 2, what="two timeouts counted")
    # the busy answer came while the idle ones were open, not after they were cut (the channel's loop
    # counts each outcome as it happens)
    assert channel.outcomes.index("busy") < channel.outcomes.index("timeout"), channel.outcomes
    with pytest.raises(errors.TicketInvalid):
        fetch_fds(channel.path, "0" * 32, 1, timeout=5)
    assert channel.serving and "busy" in channel.outcomes


def _fake_server(path: str, answer) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def run() -> None:
        with srv:
            while True:
                conn, _ = srv.accept()
                if answer(conn) == "stop":
                    return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_client_turns_each_failure_into_a_typed_error(sockdir):
    with pytest.raises(errors.Unavailable):
        fetch_fds(str(sockdir / "nobody.fds"), "t", 1, timeout=1)

    held = []
    _fake_server(str(sockdir / "mute.fds"), held.append)  # accepts, never answers
    with pytest.raises(errors.DeadlineExceeded):
        fetch_fds(str(sockdir / "mute.fds"), "t", 1, timeout=0.3)

    _fake_server(str(sockdir / "hangup.fds"), lambda conn: conn.close())
    with pytest.raises(errors.Unavailable, match="closed the connection"):
        fetch_fds(str(sockdir / "hangup.fds"), "t", 1, timeout=5)

    tries = []
    r, w = os.pipe()

    def busy_then_ok(conn: socket.socket) -> str | None:
        tries.append(1)
        with conn:
            if len(tries) < 3:
                conn.sendall(b'{"ok": false, "error": "FdChannelBusy", "message": "busy"}\n')
                return None
            socket.send_fds(conn, [b'{"ok": true, "count": 1}\n'], [r])
            return "stop"

    _fake_server(str(sockdir / "busy.fds"), busy_then_ok)
    [fd] = fetch_fds(str(sockdir / "busy.fds"), "t", 1, timeout=WAIT_TIMEOUT)
    assert len(tries) == 3
    for x in (fd, r, w):
        os.close(x)
    for conn in held:
        conn.close()


def test_the_client_sends_back_the_nonce_that_follows_its_fds(sockdir):
    r, w = os.pipe()
    acked: list[bytes] = []

    def answer(conn: socket.socket) -> str:
        with conn:
            conn.recv(256)
            socket.send_fds(conn, [b'{"ok": true, "count": 1, "ack": true}\n'], [r])
            conn.sendall(b"=cafe0123\n")
            acked.append(read_line(conn, timeout=WAIT_TIMEOUT))
        return "stop"

    t = _fake_server(str(sockdir / "ack.fds"), answer)
    [fd] = fetch_fds(str(sockdir / "ack.fds"), "t", 1, timeout=WAIT_TIMEOUT)
    t.join(WAIT_TIMEOUT)
    assert not t.is_alive(), "the fake server never ended"
    assert acked == [b"cafe0123\n"]
    for x in (fd, r, w):
        os.close(x)


def test_a_client_from_before_acknowledgements_that_closes_right_after_its_fds_is_an_ok_exchange(
    channel, tmp_path, monkeypatch
):
    from hotweights.wire.fdproto import MAGIC
    from hotweightsd.server import fdchannel
    from support.ckpt_tools import versioned_model

    m = channel.manager
    m.load("m", str(versioned_model(tmp_path, 1)), version="v")
    lease = m.open_lease("m@v", pid=os.getpid())
    ticket = m.get_handles(lease.id, 0, lease.key).ticket
    client = _connect(channel.path)
    real = fdchannel.send_reply

    async def reply_then_the_client_goes(conn, doc, fds):
        await real(conn, doc, fds)
        if doc.get("ok"):
            client.close()  # an old client: takes its fds and closes, before the daemon's nonce line

    monkeypatch.setattr(fdchannel, "send_reply", reply_then_the_client_goes)
    client.sendall(MAGIC + ticket.encode("ascii") + b"\n")
    wait_until(lambda: channel.outcomes, what="the exchange's outcome")
    assert channel.outcomes == ["ok"]


def test_a_redeem_that_waits_holds_up_no_other_connection_and_its_fds_are_closed_once_its_exchange_ended(
    sockdir, tmp_path
):
    """The redeem of one ticket waits (on the registry lock, say) until the test opens a gate: another
    connection still gets its ticket deadline's answer, the waiting one its exchange deadline's, and
    the fds the redeem returns after that are closed, not leaked (a pipe's write end among them reads
    EOF only once every copy is closed)."""
    manager = ModelManager(CpuBackend(memory_limit=64 * 2**20))
    manager.load("m", str(write_model(tmp_path / "m.safetensors")), version="v1")
    lease = manager.open_lease("m@v1", pid=os.getpid())
    ticket = manager.get_handles(lease.id, 0, lease.key).ticket
    entered, gate = threading.Event(), threading.Event()
    r, w = os.pipe()
    extra = os.dup(w)  # handed to the channel by the redeem below, which must close it
    real_redeem = manager.redeem

    def waiting_redeem(token, pid, uid):
        entered.set()
        gate.wait(60)  # a safety limit only: the test opens the gate
        got, fds = real_redeem(token, pid, uid)
        return got, [*fds, extra]

    manager.redeem = waiting_redeem  # type: ignore[method-assign]
    ch = FdChannel(str(sockdir / "r.fds"), manager, timeout=1.0, ticket_timeout=0.5)
    ch.start()
    try:
        waiting = _connect(ch.path)
        waiting.sendall(MAGIC + ticket.encode("ascii") + b"\n")
        assert entered.wait(WAIT_TIMEOUT), "the redeem never started"
        idle = _connect(ch.path)  # sends nothing: its ticket deadline must still be kept
        assert fd_channel_answer(idle, timeout=WAIT_TIMEOUT)["error"] == "DeadlineExceeded"
        assert fd_channel_answer(waiting, timeout=WAIT_TIMEOUT)["error"] == "DeadlineExceeded"
        assert not gate.is_set()
        os.close(w)
        w = -1
        gate.set()
        assert select.select([r], [], [], 10)[0] == [r], "the redeemed fds were never closed"
        assert os.read(r, 1) == b""
    finally:
        gate.set()
        if w >= 0:
            os.close(w)
        os.close(r)
        ch.stop()
        manager.close()
