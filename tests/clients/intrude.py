"""SOCKET LEASE_ID TICKET FD_SOCKET: what a process that does not hold the lease gets when it asks for the
lease's handles (GetHandles without the lease's key, then with a guessed one) and when it redeems the
holder's ticket on the fd socket. Prints one JSON line: ``handles``, ``handles_guessed_key`` and ``fds``,
each ``ok`` or the error's class name and message.

``steal_fds`` needs no gRPC: a test runs it in a forked child that has dropped to another uid."""

from __future__ import annotations

import json
import os
import sys

from hotweights.errors import HotweightsError
from hotweights.wire.fdproto import fetch_fds


def outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except HotweightsError as exc:
        return f"{type(exc).__name__}: {exc}"


def steal_fds(fd_socket: str, ticket: str) -> str:
    def fetch() -> None:
        for fd in fetch_fds(fd_socket, ticket, 1, timeout=10):
            os.close(fd)

    return outcome(fetch)


def steal_handles(socket_path: str, lease_id: str, key: str = "") -> str:
    import hotweights
    from hotweights.wire.pb import pb

    with hotweights.connect(socket_path) as c:
        return outcome(lambda: c._call(c.stub.GetHandles, pb.GetHandlesRequest(lease_id=lease_id, lease_key=key)))


if __name__ == "__main__":
    sock, lease_id, ticket, fd_socket = sys.argv[1:5]
    print(
        json.dumps(
            {
                "handles": steal_handles(sock, lease_id),
                "handles_guessed_key": steal_handles(sock, lease_id, "0" * 32),
                "fds": steal_fds(fd_socket, ticket),
            }
        ),
        flush=True,
    )
