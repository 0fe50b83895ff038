"""The fd side channel under abuse: idle and trickling connections, fd exhaustion, a dead channel.

A real daemon on a real socket; the honest clients are separate processes (tests/clients/attach_many.py).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotweights.testing import WAIT_TIMEOUT, read_line
from support.ckpt_tools import write_model
from support.daemons import spawn_client, start_daemon, wait_until

# The channel's per-connection deadline where only the cutting is tested: short, so the test is quick.
DEADLINE_S = 5.0
# Where attaches run beside the abusers: far above any run of them, even on a loaded machine, so no
# connection is cut while they run. An attach held up behind an idle connection still fails, by its
# own fd-socket timeout (10 s), long before this.
LONG_DEADLINE_S = 300.0


def _raise_own_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _closed_by_daemon(s: socket.socket, within: float) -> bytes | None:
    """What the daemon sent before closing ``s`` (b"" for nothing), or None if it did not close it."""
    got = b""
    deadline = time.monotonic() + within
    poller = select.poll()
    poller.register(s, select.POLLIN)
    while True:
        if not poller.poll(max(deadline - time.monotonic(), 0) * 1000):
            return None
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _health(sock: str) -> int:
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        return (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_TIMEOUT).status
        )


def _attach_clients(sock: str, processes: int, each: int, before: Callable[[], None] = lambda: None) -> list[dict]:
    """``processes`` attach_many clients of ``each`` attaches; ``before()`` runs once all of them are up
    (connected, torch imported) and just before they start."""
    procs = [spawn_client("attach_many", sock, "m", str(each), "wait") for _ in range(processes)]
    for p in procs:
        assert read_line(p, what='"ready" from the client').strip() == "ready"
    before()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert p.returncode == 0 and lines, f"attach_many failed ({p.returncode}):\n{out}\n{err[-4000:]}"
        results.append(json.loads(lines[-1]))
    return results


def _open_abusers(fd_path: str, idle: list[socket.socket], tricklers: list[socket.socket], stop: threading.Event):
    """Opens 500 connections that never send and 5 that send a ticket line's bytes one a second."""

    def trickle(s: socket.socket) -> None:
        for byte in b"HWT1 " * 100:
            if stop.wait(1.0):
                return
            try:
                s.send(bytes([byte]))
            except OSError:
                return  # the daemon cut it

    idle.extend(_connect(fd_path) for _ in range(500))
    tricklers.extend(_connect(fd_path) for _ in range(5))
    for s in tricklers:
        threading.Thread(target=trickle, args=(s,), daemon=True).start()


def _daemon_with_deadline(sockdir, deadline: float):
    # all 505 from this one process: the per-peer caps (test_fd_channel_peers.py) are lifted here
    args = ("--fd-channel-timeout-seconds", str(deadline), "--fd-channel-ticket-seconds", str(deadline))
    caps = ("--fd-channel-max-per-pid", "1024", "--fd-channel-max-per-uid", "1024")
    return start_daemon(str(sockdir / "hw.sock"), *args, *caps)


def test_idle_and_trickling_connections_hold_up_no_attach(sockdir, tmp_path):
    """500 connections that never send and 5 that send a byte a second, then 100 attaches: each is
    served at once, while all those connections are still open (the deadline is far off here)."""
    _raise_own_fd_limit(2048)
    with _daemon_with_deadline(sockdir, LONG_DEADLINE_S) as d:
        d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
        idle: list[socket.socket] = []
        tricklers: list[socket.socket] = []
        stop = threading.Event()
        try:
            results = _attach_clients(
                d.socket, processes=4, each=25, before=lambda: _open_abusers(d.socket + ".fds", idle, tricklers, stop)
            )
            # every connection still open: the attaches were served beside them, not after they were cut
            still_open = [s for s in idle + tricklers if _closed_by_daemon(s, 0) is None]
            latencies = sorted(x for r in results for x in r["latencies"])
            errors = [e for r in results for e in r["errors"]]
            assert sum(r["ok"] for r in results) == 100, errors
            assert errors == []
            assert latencies[-1] < LONG_DEADLINE_S, "an attach waited for the channel's deadline"
            assert len(still_open) == 505, "connections were cut long before the channel's deadline"
        finally:
            stop.set()
            for s in idle + tricklers:
                s.close()
        assert _health(d.socket) == health_pb2.HealthCheckResponse.SERVING


def test_the_deadline_cuts_idle_and_trickling_connections(sockdir):
    """The deadline cuts every connection that never finished its request, trickling or idle, with
    500 others open beside it."""
    _raise_own_fd_limit(2048)
    with _daemon_with_deadline(sockdir, DEADLINE_S) as d:
        idle: list[socket.socket] = []
        tricklers: list[socket.socket] = []
        stop = threading.Event()
        try:
            _open_abusers(d.socket + ".fds", idle, tricklers, stop)
            for s in tricklers + idle[::50]:
                said = _closed_by_daemon(s, DEADLINE_S + 60)
                assert said is not None, "a connection outlived the channel's deadline"
                if said:
                    assert json.loads(said)["error"] == "DeadlineExceeded"
        finally:
            stop.set()
            for s in idle + tricklers:
                s.close()
        assert _health(d.socket) == health_pb2.HealthCheckResponse.SERVING


def test_accept_failures_for_want_of_fds_pass_and_the_channel_serves_again(sockdir, tmp_path):
    # The per-peer caps and the ticket deadline are lifted so that idle connections from this process
    # pile up until accept() fails, however many spare fds the baseline below leaves (one the daemon
    # still held for the CLI's connection when it was counted makes one more).
    args = ("--fd-channel-timeout-seconds", "60", "--fd-channel-ticket-seconds", "60")
    caps = ("--fd-channel-max-per-pid", "1024", "--fd-channel-max-per-uid", "1024")
    with start_daemon(str(sockdir / "hw.sock"), *args, *caps) as d:
        d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
        fd_path = d.socket + ".fds"
        limits = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        open_now = len(os.listdir(f"/proc/{d.pid}/fd"))
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (open_now + 8, limits[1]))
        conns = []
        try:
            # Idle connections take the daemon's last fds; the next accept() fails with EMFILE.
            wait_until(
                lambda: conns.append(_connect(fd_path)) or "fdchannel.accept_failed" in d.logs(),
                30,
                "an accept() of the fd channel to fail",
                interval=0.01,
            )
            assert "EMFILE" in d.logs()
        finally:
            for s in conns:
                s.close()
            resource.prlimit(d.pid, resource.RLIMIT_NOFILE, limits)
        wait_until(
            lambda: "fdchannel.accept_recovered" in d.logs(),
            30,
            "the channel to accept again",
            context=lambda: f"daemon alive: {d.alive()}\n{d.logs()}",
        )
        [r] = _attach_clients(d.socket, processes=1, each=3)
        assert r["ok"] == 3, r["errors"]
        assert _health(d.socket) == health_pb2.HealthCheckResponse.SERVING
        assert "fdchannel.failed" not in d.logs()


def _listening_fd(pid: int, path: str) -> int:
    """The daemon's fd number of the listening socket bound to ``path`` (from /proc/net/unix)."""
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for row in f:
            cols = row.split()
            if len(cols) >= 8 and cols[7] == path and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON
                inodes.add(cols[6])
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(fd)
    raise AssertionError(f"no listening socket on {path} among the fds of {pid}")


def _steal_fd(pid: int, fd: int) -> int:
    """A duplicate of another process's fd (pidfd_getfd(2), Linux >= 5.6, needs ptrace rights)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd: the same number on every architecture
        if got < 0:
            err = ctypes.get_errno()
            pytest.skip(f"pidfd_getfd is not permitted here: {os.strerror(err)}")
        return got
    finally:
        os.close(pidfd)


def test_a_dead_channel_turns_health_not_serving(daemon):
    assert _health(daemon.socket) == health_pb2.HealthCheckResponse.SERVING
    fd_path = daemon.socket + ".fds"
    # Shut the daemon's own listening socket down under it. The duplicate shares the socket's file
    # status flags: made blocking, a shut-down socket's accept() fails for good (EINVAL) rather than
    # saying "try again" (EAGAIN).
    stolen = socket.socket(fileno=_steal_fd(daemon.pid, _listening_fd(daemon.pid, fd_path)))
    stolen.setblocking(True)
    stolen.shutdown(socket.SHUT_RDWR)
    stolen.close()
    wait_until(
        lambda: _health(daemon.socket) == health_pb2.HealthCheckResponse.NOT_SERVING,
        30,
        "health NOT_SERVING",
        context=daemon.logs,
    )
    assert "fdchannel.failed" in daemon.logs()
    assert daemon.status()["pid"] == daemon.pid  # the rest of the daemon still answers
