"""The side channel that hands allocation fds to clients (gRPC cannot carry fds).

Protocol, one exchange per connection: the client sends ``HWT1 <ticket>\\n``; the daemon answers
one JSON line, ``{"ok": true, "count": N}`` with the N fds attached by SCM_RIGHTS (in batches of
at most 250), or ``{"ok": false, "error": CLASS, "message": ...}``. Tickets come from GetHandles,
are single-use and expire, so only a client that holds the lease can get the fds.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Callable

import structlog

from hotweights.errors import HotweightsError, InvalidArgument
from hotweights.wire.fdproto import MAGIC
from hotweightsd.core.manager import ModelManager
from hotweightsd.server.sockets import born_with_mode

log = structlog.get_logger("hotweightsd.fdchannel")

MAX_FDS_PER_MESSAGE = 250


def send_reply(conn: socket.socket, doc: dict, fds: list[int]) -> None:
    line = (json.dumps(doc) + "\n").encode()
    if not fds:
        conn.sendall(line)
        return
    batches = [fds[i : i + MAX_FDS_PER_MESSAGE] for i in range(0, len(fds), MAX_FDS_PER_MESSAGE)]
    socket.send_fds(conn, [line], batches[0])
    for batch in batches[1:]:
        socket.send_fds(conn, [b"+"], batch)


class FdChannel:
    def __init__(
        self,
        path: str,
        manager: ModelManager,
        mode: int = 0o660,
        on_connection: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.manager = manager
        # Told each connection's outcome: ok, refused (a bad or expired ticket) or io_error.
        self.on_connection = on_connection or (lambda outcome: None)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with born_with_mode(mode):
            self._sock.bind(path)
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._serve, name="hw-fdchannel", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    outcome = self._handle(conn)
                except OSError as exc:
                    outcome = "io_error"
                    log.warning("fdchannel.io_error", error=str(exc))
                self.on_connection(outcome)

    def _handle(self, conn: socket.socket) -> str:
        fds: list[int] = []
        try:
            token = self._read_ticket(conn)
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            lease, fds = self.manager.redeem(token)
            self.manager.note_peer(lease.id, pid, uid)
            send_reply(conn, {"ok": True, "count": len(fds)}, fds)
            return "ok"
        except HotweightsError as exc:
            send_reply(conn, {"ok": False, "error": type(exc).__name__, "message": exc.message}, [])
            return "refused"
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _read_ticket(conn: socket.socket) -> str:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(256)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 256:
                break
        if not buf.startswith(MAGIC) or not buf.endswith(b"\n"):
            raise InvalidArgument("malformed ticket request")
        return buf[len(MAGIC) : -1].decode("ascii", "replace")
