"""Client side of the fd side channel: trade a ticket for the allocations' file descriptors."""

from __future__ import annotations

import json
import os
import socket

from hotweights import errors

MAGIC = b"HWT1 "  # the side channel's protocol tag; the daemon imports it from here


def fetch_fds(path: str, ticket: str, expected: int, timeout: float = 10.0) -> list[int]:
    """Returns ``expected`` new fds (the caller closes them) or raises the daemon's error."""
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            try:
                s.connect(path)
            except OSError as exc:
                raise errors.Unavailable(f"cannot reach the daemon's fd socket {path}: {exc.strerror}") from None
            s.sendall(MAGIC + ticket.encode("ascii") + b"\n")
            data, got, _, _ = socket.recv_fds(s, 65536, 253)
            fds.extend(got)
            while b"\n" not in data:
                more = s.recv(65536)
                if not more:
                    break
                data += more
            line, _, _ = data.partition(b"\n")
            try:
                reply = json.loads(line)
            except ValueError:
                raise errors.Internal(f"fd socket {path} sent a malformed reply: {line[:80]!r}") from None
            if not reply.get("ok"):
                cls = errors.error_class(reply.get("error", "")) or errors.HotweightsError
                raise cls(reply.get("message", "fd socket refused the ticket"))
            while len(fds) < reply["count"]:
                _, got, _, _ = socket.recv_fds(s, 16, 253)
                if not got:
                    break
                fds.extend(got)
        if len(fds) != expected:
            raise errors.Internal(f"fd socket sent {len(fds)} descriptors, expected {expected}")
        result, fds = fds, []
        return result
    finally:
        for fd in fds:
            os.close(fd)
