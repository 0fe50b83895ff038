"""No one peer fills the fd socket: its connections are capped per process and per user (by the
kernel's word, SO_PEERCRED), and a connection must send its ticket line soon after it connects."""

from __future__ import annotations

import socket

from support.ckpt_tools import versioned_model
from support.daemons import fd_channel_answer, run_client, start_daemon, wait_until


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_one_process_holds_at_most_its_share_and_others_still_attach(sockdir, tmp_path):
    args = ("--fd-channel-max-per-pid", "3", "--fd-channel-ticket-seconds", "60", "--fd-channel-timeout-seconds", "60")
    with start_daemon(str(sockdir / "hw.sock"), *args) as d:
        d.cli("load", "m", str(versioned_model(tmp_path, 1)), "--version", "v1", check=True)
        path = d.socket + ".fds"
        hog = [_connect(path) for _ in range(3)]
        try:
            for _ in range(5):
                with _connect(path) as extra:
                    said = fd_channel_answer(extra)
                    assert said is not None and said["error"] == "FdChannelBusy", said
                    assert "the most one process may" in said["message"]
            # another process gets its fds while this one holds its share
            assert run_client("attach_version", d.socket, "m@v1").stdout.split() == ["v1", "1"]
        finally:
            for s in hog:
                s.close()

        # the hog's connections are gone: its share is free again
        def answered_not_busy() -> bool:
            with _connect(path) as s:
                s.sendall(b"HWT1 nosuchticket\n")
                said = fd_channel_answer(s)
                return said is not None and said["error"] != "FdChannelBusy"

        wait_until(answered_not_busy, what="the closed connections to leave the process's share")


def test_a_connection_that_sends_no_ticket_line_is_cut_early(sockdir):
    args = ("--fd-channel-ticket-seconds", "0.5", "--fd-channel-timeout-seconds", "600")
    with start_daemon(str(sockdir / "hw.sock"), *args) as d:
        with _connect(d.socket + ".fds") as s:
            said = fd_channel_answer(s)
            assert said is not None and said["error"] == "DeadlineExceeded", said
            assert "no ticket line within 0.5 s" in said["message"]
