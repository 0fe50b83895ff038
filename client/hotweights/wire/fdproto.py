"""Client side of the fd side channel: trade a ticket for the allocations' file descriptors.

Every failure is a typed error: the daemon's refusal as its own class (``TicketInvalid``,
``PermissionDenied``, ...), a socket that cannot be reached or closes without an answer as
``Unavailable``, a daemon too busy to take the connection as ``FdChannelBusy`` (retried until the
timeout; the ticket is not spent), and an exchange that outlives the timeout as ``DeadlineExceeded``.

Once it holds every fd, the client sends back the nonce the daemon put after them: until a reader has
taken its fds out of the socket they count against the daemon's user, so the daemon keeps counting
an exchange that was never acknowledged against its peer (protocol: ``hotweightsd/server/fdchannel.py``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

from hotweights import errors

MAGIC = b"HWT1 "  # the side channel's protocol tag; the daemon imports it from here
RETRY_FIRST = 0.005
RETRY_MAX = 0.2


def fetch_fds(path: str, ticket: str, expected: int, timeout: float = 10.0) -> list[int]:
    """Returns ``expected`` new fds (the caller closes them) or raises a hotweights error."""
    deadline = time.monotonic() + timeout
    pause = RETRY_FIRST
    while True:
        try:
            return _exchange(path, ticket, expected, deadline, timeout)
        except errors.FdChannelBusy:
            if time.monotonic() + pause >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)


def _left(s: socket.socket, deadline: float, timeout: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded(f"the fd socket did not answer within {timeout:g} s")
    s.settimeout(left)


def _acknowledge(s: socket.socket, deadline: float, timeout: float) -> None:
    """Reads the daemon's ``=<nonce>\\n`` (it follows every fd) and sends the nonce back. Best effort:
    the fds are this process's already, and a daemon that gets no answer sees the close instead."""
    line = b""
    try:
        while not line.endswith(b"\n") and len(line) <= 64:
            _left(s, deadline, timeout)
            more = s.recv(65 - len(line))
            if not more:
                return
            line += more
        if line.startswith(b"=") and line.endswith(b"\n"):
            s.sendall(line[1:])
    except (OSError, errors.DeadlineExceeded):
        pass


def _exchange(path: str, ticket: str, expected: int, deadline: float, timeout: float) -> list[int]:
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            _left(s, deadline, timeout)
            try:
                s.connect(path)
            except (BlockingIOError, InterruptedError) as exc:
                # a full listen backlog: the daemon has not caught up with its connections yet
                raise errors.FdChannelBusy(f"the fd socket {path} takes no more connections now: {exc}") from None
            except TimeoutError:
                raise errors.DeadlineExceeded(f"connecting to the fd socket {path} took over {timeout:g} s") from None
            except OSError as exc:
                raise errors.Unavailable(f"cannot reach the daemon's fd socket {path}: {exc.strerror}") from None
            try:
                try:
                    s.sendall(MAGIC + ticket.encode("ascii") + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed before reading: its answer (busy) may still be there to read
                _left(s, deadline, timeout)
                data, got, _, _ = socket.recv_fds(s, 65536, 253)
                fds.extend(got)
                while b"\n" not in data:
                    _left(s, deadline, timeout)
                    more = s.recv(65536)
                    if not more:
                        break
                    data += more
                line, newline, _ = data.partition(b"\n")
                if not newline:
                    raise errors.Unavailable(f"the fd socket {path} closed the connection without an answer")
                try:
                    reply = json.loads(line)
                except ValueError:
                    raise errors.Internal(f"fd socket {path} sent a malformed reply: {line[:80]!r}") from None
                if not reply.get("ok"):
                    cls = errors.error_class(reply.get("error", "")) or errors.HotweightsError
                    raise cls(reply.get("message", "fd socket refused the ticket"))
                while len(fds) < reply["count"]:
                    _left(s, deadline, timeout)
                    _, got, _, _ = socket.recv_fds(s, 16, 253)
                    if not got:
                        break
                    fds.extend(got)
                if reply.get("ack") and len(fds) == reply["count"]:
                    _acknowledge(s, deadline, timeout)
            except TimeoutError:
                raise errors.DeadlineExceeded(f"the fd socket {path} did not answer within {timeout:g} s") from None
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                    raise errors.Unavailable(f"the fd socket {path} closed the connection: {exc.strerror}") from None
                raise
        if len(fds) != expected:
            raise errors.Internal(f"fd socket sent {len(fds)} descriptors, expected {expected}")
        result, fds = fds, []
        return result
    finally:
        for fd in fds:
            os.close(fd)
