"""Owning the daemon's socket path: one daemon per socket, stale files removed.

gRPC silently unlinks and rebinds an existing socket path, which would steal a live daemon's
socket. So the daemon first takes an exclusive lock beside the socket, then probe-connects:
a live peer means refuse; a dead socket file is removed.
"""

from __future__ import annotations

import fcntl
import grp
import os
import socket
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from hotweights.errors import DaemonAlreadyRunning, InvalidArgument, PermissionDenied


def alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return False
    finally:
        s.close()


class SocketOwnership:
    """Holds ``<socket>.lock`` for the daemon's lifetime; ``others`` are the daemon's other sockets
    (the operator socket), checked and cleared like the socket itself."""

    def __init__(self, path: str, others: Sequence[str] = ()) -> None:
        self.path = path
        for p in (path, *others):
            if len(p.encode()) > 107:
                raise InvalidArgument(f"socket path is {len(p.encode())} bytes; unix sockets allow 107: {p}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        for p in others:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        self.lock_path = path + ".lock"
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise DaemonAlreadyRunning(
                f"another hotweights daemon (pid {holder}) already serves {path}; stop it first or use --socket",
                socket=path,
                pid=holder,
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        for p in (path, fd_socket_path(path), *others):
            if os.path.exists(p):
                if alive(p):
                    self.release()
                    raise DaemonAlreadyRunning(f"a live process answers on {p}; refusing to take it over", socket=p)
                os.unlink(p)

    def release(self) -> None:
        # The lock file stays: unlinking it would let two later daemons lock two different inodes.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fd_socket_path(path: str) -> str:
    return path + ".fds"


@contextmanager
def born_with_mode(mode: int = 0o660):
    """Sockets bound inside this block are created with ``mode``: no window where others could connect."""
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


def existing_group(group: str) -> int:
    """The gid of ``group`` (a name or a number), or InvalidArgument if no such group exists.

    Whether this process is in it is left to ``group_id``: ``--print-config`` and ``doctor`` run as an
    operator, not as the daemon's user, so only the group's existence can be judged there."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if not group.isdigit():
            raise InvalidArgument(f"operator_group {group!r}: no such group") from None
        return int(group)


def group_id(group: str) -> int:
    """The gid of ``group`` (a name or a number) that this process may give its sockets to; else
    InvalidArgument or PermissionDenied naming it, before any socket exists."""
    gid = existing_group(group)
    if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
        raise PermissionDenied(
            f"operator_group {group!r}: the daemon's user is not in that group, so it cannot give it the "
            f"operator socket (the unit's SupplementaryGroups= must name it)",
            gid=gid,
        )
    return gid


def open_to_group(path: str, gid: int) -> None:
    """Gives the socket at ``path`` (created 0600) to group ``gid`` and then makes it 0660: at no time
    may anyone but the owner and that group connect."""
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise PermissionDenied(
            f"cannot give {path} to group {gid}: the daemon's user is not in that group (the unit's "
            f"SupplementaryGroups= must name it)",
            socket=path,
            gid=gid,
        ) from None
    os.chmod(path, 0o660)
