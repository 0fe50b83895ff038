"""The metrics socket is open to every reader: a silent connection is closed after its timeout, and
past the connection cap a new one is answered 503 at once, so idle connections cannot pile up threads."""

from __future__ import annotations

import os
import socket
import time

from hotweightsd.server.metrics import CONNECTION_THREAD
from support.daemons import start_daemon, wait_until


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _scrape(path: str) -> bytes:
    with _connect(path) as s:
        s.settimeout(30)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(4096) == b""
    except TimeoutError:
        return False


def _threads(pid: int) -> int:
    """The daemon's metrics connection threads: its other threads (gRPC's among them) come and go on
    their own, so counting all of them makes a flaky baseline."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                n += f.read().strip() == CONNECTION_THREAD
        except FileNotFoundError:  # ended meanwhile
            continue
    return n


def test_idle_metrics_connections_are_capped_and_closed(sockdir):
    # long enough that the idle connections are still open, on a loaded machine, when the cap is tried
    args = ("--metrics-max-connections", "4", "--metrics-timeout-seconds", "10")
    with start_daemon(str(sockdir / "hw.sock"), *args) as d:
        path = d.socket + ".metrics"
        before = _threads(d.pid)
        assert _scrape(path).startswith(b"HTTP/1.0 200")
        # counted before the scrape: its handler's thread may outlive the answer by a moment
        wait_until(lambda: _threads(d.pid) <= before, what="the scrape's thread to end")
        idle = [_connect(path) for _ in range(4)]
        wait_until(lambda: _threads(d.pid) >= before + 4, what="a thread for each of the 4 idle connections")
        # the cap is reached: more connections are answered busy and closed, with no thread
        extra = [_connect(path) for _ in range(20)]
        for s in extra:
            s.settimeout(30)
            assert s.recv(4096).startswith(b"HTTP/1.0 503"), "a connection past the cap was not answered busy"
            s.close()
        # a client that sends its request only after the answer came (as a slow one does) still may: the
        # daemon reads it before closing, so the client sees the 503, not a broken pipe or a reset
        late = _connect(path)
        late.settimeout(30)
        assert late.recv(4096).startswith(b"HTTP/1.0 503")
        late.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert late.recv(4096) == b""  # the end of the answer, not ECONNRESET
        late.close()
        assert _threads(d.pid) <= before + 4
        # the idle ones are closed by the daemon, and their threads end
        for s in idle:
            wait_until(lambda s=s: _closed(s), what="the daemon to close a silent metrics connection")
            s.close()
        wait_until(lambda: _threads(d.pid) <= before, what="the idle connections' threads to end")
        assert _scrape(path).startswith(b"HTTP/1.0 200")


def test_a_connection_that_trickles_its_request_is_cut_at_the_deadline(sockdir):
    """The timeout bounds the whole connection, not each read: a byte now and then does not keep it open."""
    with start_daemon(str(sockdir / "hw.sock"), "--metrics-timeout-seconds", "1") as d:
        with _connect(d.socket + ".metrics") as s:
            request, sent = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 600, 0
            while sent < len(request):  # 5 minutes at this pace: far past the deadline
                try:
                    s.sendall(request[sent : sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                if _closed(s):
                    break
                time.sleep(0.5)  # the trickle's pace, slower than nothing but faster than the timeout
            assert sent < len(request), "the daemon kept a trickling metrics connection open"
