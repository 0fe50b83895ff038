"""A reader that redeems tickets and never reads the fds: the daemon keeps each such exchange open and
counted against the reader's user until it is read or closed, and refuses that user more once it
holds its share, so unread fds cannot pile up against the daemon's in-flight limit."""

from __future__ import annotations

import os
import socket
import threading

from hotweights.wire.pb import pb
from support.ckpt_tools import versioned_model
from support.daemons import fd_channel_answer, run_client, start_daemon, wait_until


def test_unread_exchanges_are_held_counted_and_capped_per_user(sockdir, tmp_path):
    import hotweights

    args = ("--fd-channel-max-unacked-per-uid", "2", "--fd-channel-timeout-seconds", "1")
    with start_daemon(str(sockdir / "hw.sock"), *args) as d:
        d.cli("load", "m", str(versioned_model(tmp_path, 1)), "--version", "v1", check=True)
        # a client that reads its fds is served; whether its ack beat the 1 s deadline depends on the
        # load, and a late one is logged before the client exits, so only what comes after is counted
        assert run_client("attach_version", d.socket, "m@v1").stdout.split() == ["v1", "1"]
        start = len(d.logs())
        fd_path = d.socket + ".fds"
        c = hotweights.connect(d.socket)
        done = threading.Event()

        def requests():
            yield pb.LeaseRequest(open=pb.LeaseOpen(ref="m@v1", pid=os.getpid(), holder="unread"))
            done.wait(120)

        lease = c.stub.Lease(requests())
        granted = next(lease).granted
        unread: list[socket.socket] = []
        try:
            for _ in range(2):
                h = c.stub.GetHandles(pb.GetHandlesRequest(lease_id=granted.lease_id, lease_key=granted.lease_key))
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(fd_path)
                s.sendall(b"HWT1 " + h.ticket.encode() + b"\n")
                unread.append(s)
            wait_until(
                lambda: d.logs()[start:].count("fdchannel.unacknowledged") == 2,
                what="both unread exchanges to outlive their deadline and be held",
                context=d.logs,
            )
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(fd_path)
                said = fd_channel_answer(s)
            assert said is not None and said["error"] == "FdChannelBusy", said
            assert "whose fds it has not read" in said["message"]
            assert "fdchannel.io_error" not in d.logs()
        finally:
            for s in unread:
                s.close()
            done.set()
        # closing them drops the fds and frees the user's share: attaches work again, and a peer that
        # closes with its reply unread is an ordinary end, not an I/O error
        wait_until(
            lambda: run_client("attach_version", d.socket, "m@v1", check=False).returncode == 0,
            what="an attach once the unread exchanges were closed",
            context=d.logs,
        )
        assert "fdchannel.io_error" not in d.logs()
        c.close()
