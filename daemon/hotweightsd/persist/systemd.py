"""The daemon's side of systemd's service protocol, in plain Python (no libsystemd, no gRPC).

sd_notify(3) readiness/watchdog messages, the file descriptor store (FDSTORE=1 / FDNAME=) and
sd_listen_fds_with_names(3). Every function is a no-op returning False / None / {} when the
process is not run by a service manager, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import socket
from collections.abc import Sequence

from hotweights.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
# The kernel's SCM_MAX_FD: one datagram carries at most this many descriptors.
_MAX_FDS_PER_MESSAGE = 253
# A wedged service manager must not hang the daemon (the notify socket is a blocking datagram
# socket: a full receive queue blocks the sender).
_SEND_TIMEOUT_S = 5.0
_FDNAME_MAX = 255


def _notify_address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    # systemd >= 253 also speaks vsock:; a VM guest daemon is not a case hotweights serves.
    raise InvalidArgument(
        f"NOTIFY_SOCKET={addr!r} is neither an absolute path nor an abstract "
        "socket ('@name'); hotweights cannot notify the service manager there"
    )


def notify(*fields: str, fds: Sequence[int] = ()) -> bool:
    """Sends ``KEY=VALUE`` fields (and ``fds`` by SCM_RIGHTS) to the service manager.

    Returns False when there is no service manager ($NOTIFY_SOCKET unset). Raises InvalidArgument
    for a malformed field and Unavailable when the manager's socket cannot be reached.
    """
    for field in fields:
        key, sep, _ = field.partition("=")
        if not sep or not key or "\n" in field:
            raise InvalidArgument(f"notify field {field!r} is not one line of the form KEY=VALUE")
    if len(fds) > _MAX_FDS_PER_MESSAGE:
        raise InvalidArgument(
            f"{len(fds)} fds in one notify message; the kernel passes at most "
            f"{_MAX_FDS_PER_MESSAGE} (store_fds splits larger sets)"
        )
    addr = _notify_address()
    if addr is None:
        return False
    payload = "\n".join(fields).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(_SEND_TIMEOUT_S)
        try:
            sock.sendmsg([payload], ancillary, 0, addr)
        except OSError as exc:
            if exc.errno == errno.EBADF and fds:
                raise InvalidArgument(
                    f"cannot pass fds {list(fds)} to the service manager: one of them is not an open file descriptor"
                ) from exc
            shown = os.environ.get("NOTIFY_SOCKET")
            raise Unavailable(
                f"cannot notify the service manager at NOTIFY_SOCKET={shown!r}: {exc}", socket=shown, errno=exc.errno
            ) from exc
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *_status_field(status))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *_status_field(status))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify(*_status_field(text))


def _status_field(text: str | None) -> list[str]:
    # STATUS= is one line in the protocol; a multi-line message would be split into bogus fields.
    return [] if text is None else ["STATUS=" + " ".join(text.splitlines())]


def check_fdname(name: str) -> str:
    """Returns ``name`` if systemd accepts it as an FDNAME=, else raises InvalidArgument."""
    if not name:
        raise InvalidArgument("fd store name is empty")
    if len(name) > _FDNAME_MAX:
        raise InvalidArgument(
            f"fd store name is {len(name)} characters long; systemd allows at most {_FDNAME_MAX}: {name[:40]!r}..."
        )
    bad = sorted({c for c in name if c == ":" or not (c.isascii() and c.isprintable())})
    if bad:
        # ':' separates names in LISTEN_FDNAMES, so systemd refuses it.
        raise InvalidArgument(
            f"fd store name {name!r} contains {''.join(bad)!r}; systemd accepts only printable ASCII without ':'"
        )
    return name


def fdstore_enabled() -> bool:
    """True when the manager told us (systemd >= 254, $FDSTORE) that it keeps stored fds.

    Older systemd keeps them too when FileDescriptorStoreMax= > 0 but does not say so; without the
    signal we cannot tell a store that drops our fds from one that keeps them, so we report False.
    """
    if os.environ.get("NOTIFY_SOCKET") is None:
        return False
    try:
        return int(os.environ.get("FDSTORE", "0")) > 0
    except ValueError:
        return False


def no_fdstore_note() -> str:
    """Why a restart will reload from storage, when a service manager runs us without an fd store; else ""."""
    if os.environ.get("NOTIFY_SOCKET") is None or fdstore_enabled():
        return ""
    return (
        "the service manager set no $FDSTORE (systemd older than 254, or FileDescriptorStoreMax=0): "
        "no memory is kept across a restart, which reloads every version from storage"
    )


def store_fds(name: str, fds: Sequence[int], *, poll: bool = False) -> bool:
    """Hands ``fds`` to the fd store under ``name``; the restarted daemon gets them back.

    ``poll=False`` (FDPOLL=0): systemd otherwise drops a stored fd when it reports POLLHUP/POLLERR,
    and memory handles (memfd, CUDA VMM exports) are not sockets whose hangup means anything.
    """
    check_fdname(name)
    if not fds:
        raise InvalidArgument(f"store_fds({name!r}) was given no fds")
    fields = ["FDSTORE=1", f"FDNAME={name}"] + ([] if poll else ["FDPOLL=0"])
    # More fds than one datagram carries go in several messages under the same name.
    for i in range(0, len(fds), _MAX_FDS_PER_MESSAGE):
        if not notify(*fields, fds=fds[i : i + _MAX_FDS_PER_MESSAGE]):
            return False
    return True


def remove_fds(name: str) -> bool:
    """Drops every stored fd named ``name`` from the fd store (FDSTOREREMOVE=1)."""
    return notify("FDSTOREREMOVE=1", f"FDNAME={check_fdname(name)}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds when the manager expects WATCHDOG=1 from us, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we are a child of the watched one)
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidArgument(f"WATCHDOG_USEC={usec!r} is not a positive number of microseconds")
    return value / 1e6


def listen_fds(unset_env: bool = True) -> dict[str, list[int]]:
    """The fds the manager passed to this process (LISTEN_FDS from fd 3), grouped by name.

    Unnamed fds are listed as "unknown", as sd_listen_fds_with_names does. Each fd gets
    FD_CLOEXEC so it does not leak into processes the daemon starts. With ``unset_env`` the
    LISTEN_* variables are removed so that our children do not take the fds for theirs.
    """
    try:
        return _listen_fds()
    finally:
        if unset_env:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(key, None)


def _listen_fds() -> dict[str, list[int]]:
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if not pid or pid != str(os.getpid()) or count is None:
        return {}
    try:
        n = int(count)
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidArgument(f"LISTEN_FDS={count!r} is not a count of file descriptors")
    names_env = os.environ.get("LISTEN_FDNAMES")
    names = names_env.split(":") if names_env is not None else ["unknown"] * n
    if len(names) != n:
        raise InvalidArgument(
            f"LISTEN_FDNAMES names {len(names)} fds but LISTEN_FDS={n}: "
            "the service manager's environment is inconsistent"
        )
    out: dict[str, list[int]] = {}
    for fd, name in zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n), names):
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise InvalidArgument(f"LISTEN_FDS says fd {fd} ({name!r}) was passed, but it is not open: {exc}") from exc
        out.setdefault(name, []).append(fd)
    return out


async def watchdog_loop(stop_event: asyncio.Event) -> None:
    """Sends WATCHDOG=1 every half interval until ``stop_event`` is set; returns at once if the
    manager runs no watchdog for us. A failed ping is logged, not raised: the next may succeed,
    and a manager that really lost us kills the process anyway."""
    interval = watchdog_interval()
    if interval is None:
        return
    while not stop_event.is_set():
        try:
            # In a thread: a blocked manager socket must not stall the event loop.
            await asyncio.to_thread(watchdog)
        except Unavailable as exc:
            log.warning("watchdog ping failed: %s", exc)
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=interval / 2)
        except TimeoutError:
            pass
