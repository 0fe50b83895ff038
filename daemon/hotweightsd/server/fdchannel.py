"""The side channel that hands allocation fds to clients (gRPC cannot carry fds).

Protocol, one exchange per connection: the client sends ``HWT1 <ticket>\\n``; the daemon answers
one JSON line, ``{"ok": true, "count": N, "ack": true}`` with the N fds attached by SCM_RIGHTS (in
batches of at most 250, each further batch on a ``+``), then ``=<nonce>\\n``; or
``{"ok": false, "error": CLASS, "message": ...}``. The client acknowledges by sending ``<nonce>\\n``
back, which it can read only after every fd before it: fds sent and not yet read stay charged to the
daemon's user (the kernel's in-flight count), and past its fd limit every send of fds fails, for
every client. So the daemon closes a connection only once its peer has acknowledged or closed it; a
peer that does neither within the deadline keeps its connection open and counted against its
shares, and a user holding ``fd_channel_max_unacked_per_uid`` such exchanges is answered busy.
(A client that predates the acknowledgement closes the connection as soon as it has its fds.)

Tickets come from GetHandles, are single-use, expire and are bound to the lease's holder: the
kernel's word on the connecting process (SO_PEERCRED) must name the pid that opened the lease (and,
once known, its uid), or the answer is PermissionDenied, the ticket stays unspent and the lease
record unchanged.

The channel is an asyncio server on an event loop of its own thread, so no client can hold up
another: each connection has a deadline (``fd_channel_timeout_seconds``) for its whole exchange and
a shorter one (``fd_channel_ticket_seconds``) for its ticket line; beyond
``fd_channel_max_connections`` open at once, or beyond one process's share
(``fd_channel_max_per_pid``) or one user's (``fd_channel_max_per_uid``), by the kernel's word
(SO_PEERCRED), a new connection is answered ``FdChannelBusy`` at once and closed, so the listen
backlog never fills and no one peer fills the channel; an accept() that fails for want of fds or
buffers is logged and retried after a growing pause. Anything else that ends the accept loop is
reported to ``on_failure`` (the daemon turns its health NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import structlog

from hotweights.errors import (
    DeadlineExceeded,
    FdChannelBusy,
    HotweightsError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TicketInvalid,
)
from hotweights.wire.fdproto import MAGIC
from hotweightsd.core.manager import ModelManager
from hotweightsd.server.sockets import born_with_mode

log = structlog.get_logger("hotweightsd.fdchannel")

MAX_FDS_PER_MESSAGE = 250
MAX_REQUEST = 256
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# Threads that redeem tickets: a redeem takes the ticket-book and registry locks, which the loop must
# never wait on (one wait there would hold up every other connection and its deadline).
REDEEM_THREADS = 4
SERVING = 64  # connections redeeming a ticket or sending fds at once (each holds the rank's fds)
# accept() failures that pass: out of fds (process, system), of kernel memory, or a peer gone first
RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO})
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 1.0


def _line(doc: dict) -> bytes:
    return (json.dumps(doc) + "\n").encode()


def _error_line(exc: HotweightsError) -> bytes:
    return _line({"ok": False, "error": type(exc).__name__, "message": exc.message})


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded them at connect()."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


async def _writable(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(conn.fileno())


async def _send(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """``data`` with ``fds`` attached to its first byte, on a non-blocking socket."""
    while True:
        try:
            sent = socket.send_fds(conn, [data], fds) if fds else conn.send(data)
            break
        except BlockingIOError:
            await _writable(conn)
    if sent < len(data):
        await asyncio.get_running_loop().sock_sendall(conn, data[sent:])


async def send_reply(conn: socket.socket, doc: dict, fds: list[int]) -> None:
    batches = [fds[i : i + MAX_FDS_PER_MESSAGE] for i in range(0, len(fds), MAX_FDS_PER_MESSAGE)] or [[]]
    await _send(conn, _line(doc), batches[0])
    for batch in batches[1:]:
        await _send(conn, b"+", batch)


def _send_now(conn: socket.socket, data: bytes) -> None:
    """A short reply on a socket that is about to be closed: best effort, never waits."""
    try:
        conn.send(data)
    except OSError:
        pass


class FdChannel:
    def __init__(
        self,
        path: str,
        manager: ModelManager,
        mode: int = 0o660,
        on_connection: Callable[[str], None] | None = None,
        *,
        timeout: float = 5.0,
        max_connections: int = 1024,
        max_per_pid: int = 8,
        max_per_uid: int = 256,
        max_unacked_per_uid: int = 16,
        ticket_timeout: float = 2.0,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.path = path
        self.manager = manager
        self.timeout = timeout
        self.ticket_timeout = min(ticket_timeout, timeout)
        self.max_connections = max_connections
        self.max_per_pid = max_per_pid
        self.max_per_uid = max_per_uid
        self.max_unacked_per_uid = max_unacked_per_uid
        self._per_pid: dict[int, int] = {}
        self._per_uid: dict[int, int] = {}
        self._unacked: dict[int, int] = {}  # uid -> exchanges past their deadline, fds maybe unread
        # Told each connection's outcome: ok, refused (a bad or expired ticket), denied (not the
        # lease's holder), busy, timeout, io_error; and accept_error for each failed accept().
        self.on_connection = on_connection or (lambda outcome: None)
        self.on_failure = on_failure or (lambda exc: None)
        self.failure: BaseException | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with born_with_mode(mode):
            self._sock.bind(path)
        self._sock.listen(BACKLOG)
        self._sock.setblocking(False)
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hw-fdchannel", daemon=True)
        self._stopping = False
        self._redeemers = ThreadPoolExecutor(REDEEM_THREADS, thread_name_prefix="hw-redeem")

    @property
    def serving(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        self._stopping = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # its loop has ended already
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._redeemers.shutdown(wait=False, cancel_futures=True)
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._task = asyncio.current_task()
        self._serving = asyncio.Semaphore(SERVING)
        conns: set[asyncio.Task] = set()
        self._ready.set()
        try:
            await self._accept_loop(conns)
            raise RuntimeError("the accept loop ended")
        except asyncio.CancelledError:
            if not self._stopping:
                self._failed(RuntimeError("the accept loop was cancelled"))
        except BaseException as exc:
            self._failed(exc)
        finally:
            for t in conns:
                t.cancel()
            await asyncio.gather(*conns, return_exceptions=True)

    def _failed(self, exc: BaseException) -> None:
        if self._stopping:
            return
        self.failure = exc
        log.error("fdchannel.failed", error=f"{type(exc).__name__}: {exc}", socket=self.path)
        self.on_failure(exc)

    async def _accept_loop(self, conns: set[asyncio.Task]) -> None:
        loop = asyncio.get_running_loop()
        delay, failures = 0.0, 0
        while not self._stopping:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno not in RETRY_ERRNOS:
                    raise
                failures += 1
                delay = min(max(delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
                if failures == 1:
                    log.warning("fdchannel.accept_failed", errno=errno.errorcode.get(exc.errno or 0), error=str(exc))
                self.on_connection("accept_error")
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("fdchannel.accept_recovered", failures=failures)
                delay, failures = 0.0, 0
            try:
                creds = peer_credentials(conn)
            except OSError as exc:
                log.warning("fdchannel.io_error", error=str(exc))
                conn.close()
                self.on_connection("io_error")
                continue
            busy = self._busy_for(*creds[:2])
            if busy is not None:
                _send_now(conn, _error_line(busy))
                conn.close()
                self.on_connection("busy")
                continue
            self._open += 1
            self._per_pid[creds[0]] = self._per_pid.get(creds[0], 0) + 1
            self._per_uid[creds[1]] = self._per_uid.get(creds[1], 0) + 1
            task = loop.create_task(self._serve(conn, creds))
            conns.add(task)
            task.add_done_callback(conns.discard)

    def _busy_for(self, pid: int, uid: int) -> HotweightsError | None:
        if self._open >= self.max_connections:
            return _busy(self._open)
        if self._per_pid.get(pid, 0) >= self.max_per_pid:
            return FdChannelBusy(
                f"pid {pid} has {self.max_per_pid} connections open on the fd socket, the most one process "
                "may: finish those first"
            )
        if self._unacked.get(uid, 0) >= self.max_unacked_per_uid:
            return FdChannelBusy(
                f"uid {uid} holds {self._unacked[uid]} fd socket connections whose fds it has not read: "
                "read or close those first"
            )
        if self._per_uid.get(uid, 0) >= self.max_per_uid:
            return FdChannelBusy(
                f"uid {uid} has {self.max_per_uid} connections open on the fd socket, the most one user may: "
                "try again shortly"
            )
        return None

    @staticmethod
    def _release(counts: dict[int, int], who: int) -> None:
        left = counts.pop(who) - 1
        if left:
            counts[who] = left

    async def _serve(self, conn: socket.socket, creds: tuple[int, int, int]) -> None:
        outcome = "io_error"
        nonce = b""
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    outcome, nonce = await self._exchange(conn, creds)
                    if nonce:
                        await self._acknowledged(conn, nonce)
            except TimeoutError:
                if not nonce:
                    outcome = "timeout"
                    _send_now(conn, _error_line(_deadline(self.timeout)))
                    return
                outcome = await self._held(conn, nonce, creds)
        except OSError as exc:
            if exc.errno == errno.ETOOMANYREFS:
                outcome = "too_many_refs"
                log.error(
                    "fdchannel.too_many_refs",
                    pid=creds[0],
                    uid=creds[1],
                    error="the daemon's user has too many fds in flight (sent, not yet read by clients): "
                    "no fds can be sent until clients read or close theirs",
                )
                _send_now(
                    conn, _error_line(ResourceExhausted("the daemon cannot send fds now: too many are in flight"))
                )
            else:
                log.warning("fdchannel.io_error", error=str(exc))
        except Exception:
            log.exception("fdchannel.internal_error")
        finally:
            conn.close()
            self._open -= 1
            self._release(self._per_pid, creds[0])
            self._release(self._per_uid, creds[1])
            self.on_connection(outcome)

    @staticmethod
    async def _acknowledged(conn: socket.socket, nonce: bytes) -> None:
        """Returns once the peer has sent ``nonce`` back or closed the connection (either way, the
        fds are no longer in flight); anything else it sends is read and ignored."""
        loop = asyncio.get_running_loop()
        seen = b""
        while True:
            try:
                chunk = await loop.sock_recv(conn, 256)
            except ConnectionResetError:  # closed with our reply unread: the kernel dropped its fds
                return
            if not chunk:
                return
            seen = (seen + chunk)[-(len(nonce) + 1) :]
            if seen.endswith(nonce + b"\n"):
                return

    async def _held(self, conn: socket.socket, nonce: bytes, creds: tuple[int, int, int]) -> str:
        """Waits, without a deadline, for the ack of a peer that has not read its fds in time: the
        connection stays open and counted against the peer's shares until it does or closes."""
        uid = creds[1]
        self._unacked[uid] = self._unacked.get(uid, 0) + 1
        log.warning("fdchannel.unacknowledged", pid=creds[0], uid=uid, held=self._unacked[uid])
        try:
            await self._acknowledged(conn, nonce)
        finally:
            self._release(self._unacked, uid)
        return "unacked"

    async def _exchange(self, conn: socket.socket, creds: tuple[int, int, int]) -> tuple[str, bytes]:
        """The outcome, and the nonce the peer must send back (b"" when no fds were sent)."""
        pid, uid, _gid = creds
        try:
            try:
                async with asyncio.timeout(self.ticket_timeout):
                    token = await self._read_ticket(conn)
            except TimeoutError:
                # A ticket line is one short write: a peer that has not sent it by now only holds a slot.
                _send_now(conn, _error_line(DeadlineExceeded(f"no ticket line within {self.ticket_timeout:g} s")))
                return "timeout", b""
            async with self._serving:
                fds = await self._redeem(token, pid, uid)
                nonce = secrets.token_hex(8).encode()
                try:
                    await send_reply(conn, {"ok": True, "count": len(fds), "ack": True}, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                try:
                    await _send(conn, b"=" + nonce + b"\n", [])
                except (BrokenPipeError, ConnectionResetError):
                    # A client from before acknowledgements takes its fds and closes at once: it has them.
                    return "ok", b""
            return "ok", nonce
        except HotweightsError as exc:
            await send_reply(conn, {"ok": False, "error": type(exc).__name__, "message": exc.message}, [])
            if isinstance(exc, PermissionDenied) and not isinstance(exc, TicketInvalid):
                log.warning("fdchannel.denied", pid=pid, uid=uid, error=exc.message)
                return "denied", b""
            return "refused", b""

    async def _redeem(self, token: str, pid: int, uid: int) -> list[int]:
        """The fds ``manager.redeem`` exports for ``token``, redeemed in a worker thread. An exchange that
        is cancelled meanwhile (its deadline, or the channel stopping) cannot stop the redeem: the fds it
        then returns belong to no one, and are closed as soon as they come."""
        call = self._redeemers.submit(self.manager.redeem, token, pid, uid)
        try:
            _, fds = await asyncio.shield(asyncio.wrap_future(call))
        except asyncio.CancelledError:
            # on the thread's own future: it runs even once this loop has ended
            call.add_done_callback(_close_unsent)
            raise
        return fds

    @staticmethod
    async def _read_ticket(conn: socket.socket) -> str:
        loop = asyncio.get_running_loop()
        buf = b""
        while not buf.endswith(b"\n") and len(buf) <= MAX_REQUEST:
            chunk = await loop.sock_recv(conn, MAX_REQUEST + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
        if not buf.startswith(MAGIC) or not buf.endswith(b"\n"):
            raise InvalidArgument("malformed ticket request")
        return buf[len(MAGIC) : -1].decode("ascii", "replace")


def _close_unsent(call: Future) -> None:
    if call.cancelled() or call.exception() is not None:
        return
    for fd in call.result()[1]:
        os.close(fd)


def _busy(open_now: int) -> HotweightsError:
    return FdChannelBusy(f"the fd socket is serving {open_now} connections, the most it takes: try again shortly")


def _deadline(timeout: float) -> HotweightsError:
    return DeadlineExceeded(f"the exchange on the fd socket took longer than {timeout:g} s")
