"""Where the daemon's socket is, and why no daemon answers on it.

``resolve_socket``/``resolve_operator_socket`` pick the paths a client connects to (an argument, the
environment, the default rules of ``hotweights.paths``); ``diagnose_unreachable`` and
``operator_unreachable`` probe a path no daemon answered on and name the cause and its fix (not
running, the wrong path, a stale socket, a group this user is not in). They read the file system
only and import no gRPC: ``hotweights.client`` calls them when a call finds no daemon.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket as _socket
import stat as _stat
from collections.abc import Callable

from hotweights import errors
from hotweights.paths import SYSTEM_SOCKET, default_socket, operator_socket_for

DEFAULT_ORIGIN = "the default, as neither --socket nor HOTWEIGHTS_SOCKET is set"


def resolve_socket(socket: str | None, origin: str | None = None) -> tuple[str, str]:
    """(socket path, where it came from): the argument, else ``$HOTWEIGHTS_SOCKET``, else the default."""
    if socket:
        return socket, origin or "the socket argument"
    env = os.environ.get("HOTWEIGHTS_SOCKET")
    if env:
        return env, "HOTWEIGHTS_SOCKET"
    path = default_socket()
    if path != SYSTEM_SOCKET and not os.path.exists(path) and os.path.isdir(os.path.dirname(SYSTEM_SOCKET)):
        # A system daemon's directory exists but this user cannot see into it: aim at its socket, so
        # that an error names the missing group instead of a per-user path nobody listens on.
        path = SYSTEM_SOCKET
    return path, DEFAULT_ORIGIN


def resolve_operator_socket(socket: str, operator_socket: str | None = None) -> tuple[str, str]:
    """(operator socket path, where it came from): the argument, else ``$HOTWEIGHTS_OPERATOR_SOCKET``,
    else ``<socket>.admin``."""
    # "auto" means <socket>.admin here as in the daemon's config, which reads the same variable
    if operator_socket:
        return operator_socket_for(socket, operator_socket), "the operator_socket argument"
    env = os.environ.get("HOTWEIGHTS_OPERATOR_SOCKET")
    if env:
        return operator_socket_for(socket, env), "HOTWEIGHTS_OPERATOR_SOCKET"
    return operator_socket_for(socket), f"the daemon's socket {socket} (<socket>.admin)"


def _connect_probe(path: str) -> None:
    """A plain connect to the unix socket: raises the OSError the kernel gives."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
    finally:
        s.close()


def operator_unreachable(
    rpc: str,
    path: str,
    origin: str,
    unreachable: errors.Unavailable,
    *,
    readers_socket: str = "",
    stat: Callable[[str], os.stat_result] = os.stat,
    connect: Callable[[str], None] = _connect_probe,
) -> errors.HotweightsError:
    """``OperatorRequired`` when the operator socket itself refuses this user (a reader); when there is
    none but a daemon answers on ``readers_socket``, an Unavailable that says the operator socket is
    elsewhere; else ``unreachable`` (no daemon, a directory on the way closed to this user, ...)."""
    if unreachable.details.get("reason") == "not_found" and readers_socket:
        try:
            connect(readers_socket)
        except OSError:
            return unreachable
        fix = (
            "give the daemon's operator_socket (see its config, or its log line daemon.serving) with "
            "--operator-socket or HOTWEIGHTS_OPERATOR_SOCKET"
        )
        return errors.Unavailable(
            f"a daemon answers on {readers_socket}, but there is no operator socket at {path} (from {origin}): "
            f"its operator_socket is elsewhere, or it predates operator sockets. Fix: {fix}",
            socket=readers_socket,
            operator_socket=path,
            origin=origin,
            reason="no_operator_socket",
            fix=fix,
        )
    if unreachable.details.get("reason") != "permission":
        return unreachable
    try:
        st = stat(path)
    except OSError:
        return unreachable
    name, _ = _user()
    mode = _stat.S_IMODE(st.st_mode)
    what = f"{path} is mode {mode:04o}, owner {_owner_name(st.st_uid)}, group {_group_name(st.st_gid)}"
    fix = (
        "run it as an operator: the daemon's user or a member of its operator_group (under systemd "
        f"`sudo usermod -aG hotweights-admin {name}`, then log in again)"
    )
    return errors.OperatorRequired(
        f"{rpc} needs the operator role, and user {name} may not use the operator socket (from {origin}): "
        f"{what}. Fix: {fix}",
        rpc=rpc,
        operator_socket=path,
        origin=origin,
        reason="permission",
        fix=fix,
    )


def _user() -> tuple[str, set[int]]:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    return name, {os.getegid(), *os.getgroups()}


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def diagnose_unreachable(
    path: str,
    origin: str,
    detail: str = "",
    *,
    stat: Callable[[str], os.stat_result] = os.stat,
    connect: Callable[[str], None] = _connect_probe,
    user: Callable[[], tuple[str, set[int]]] = _user,
) -> errors.Unavailable:
    """Why no daemon answers on ``path``: probes the path itself (gRPC's message says only
    "connect failed") and names one of: no socket there (not running, or the wrong path), a socket
    nobody listens on (stale: the daemon is down), or no permission (not in the socket's group).
    The error's details carry ``reason``, ``socket``, ``origin`` and ``fix``. ``stat``, ``connect``
    and ``user`` are replaceable for tests."""
    where = f"{path} (from {origin})"
    start = "start the daemon: `sudo systemctl start hotweights`, or `hotweights serve` in a shell"

    def unavailable(reason: str, problem: str, fix: str, **more: str) -> errors.Unavailable:
        return errors.Unavailable(f"{problem}. Fix: {fix}", socket=path, origin=origin, reason=reason, fix=fix, **more)

    try:
        st = stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        missing_dir = ""
        try:
            stat(parent)
        except FileNotFoundError:
            missing_dir = f"; {parent} does not exist either"
        except OSError:
            pass
        return unavailable(
            "not_found",
            f"no hotweights daemon socket at {path} (from {origin}{missing_dir}): the daemon is not running, or it "
            f"listens on another path",
            f"{start}; or give the path it listens on (the socket key of /etc/hotweights/config.toml) "
            f"with --socket or HOTWEIGHTS_SOCKET",
        )
    except PermissionError:
        return _permission(path, origin, _blocking_dir(path, stat), stat, user)
    except OSError as exc:
        return unavailable("not_found", f"cannot reach {where}: {exc.strerror}", "check the path")
    if not _stat.S_ISSOCK(st.st_mode):
        return unavailable(
            "not_socket",
            f"{where} is not a socket: the wrong path",
            "give the daemon's socket with --socket or HOTWEIGHTS_SOCKET",
        )
    try:
        connect(path)
    except ConnectionRefusedError:
        return unavailable(
            "refused",
            f"nothing listens on {where}: the socket file is stale, the daemon that made it is not running",
            f"{start}; `journalctl -u hotweights -e` says why it stopped",
        )
    except PermissionError:
        return _permission(path, origin, path, stat, user)
    except OSError as exc:
        return unavailable("refused", f"cannot connect to {where}: {exc.strerror or exc}", start)
    return unavailable(
        "no_answer",
        f"{where} accepts connections but no hotweights daemon answered ({detail or 'no detail'}); "
        f"it may be starting, stopping or stuck",
        "wait for it to start, or see `journalctl -u hotweights -e` and `hotweights doctor`",
    )


def _blocking_dir(path: str, stat: Callable[[str], os.stat_result]) -> str:
    """The nearest directory above ``path`` that can be stat'ed: the one whose mode stops us."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            stat(d)
            return d
        except OSError:
            if d == os.path.dirname(d):
                return d
            d = os.path.dirname(d)


def _permission(
    path: str,
    origin: str,
    denied: str,
    stat: Callable[[str], os.stat_result],
    user: Callable[[], tuple[str, set[int]]],
) -> errors.Unavailable:
    """The error for a directory on the way (``denied`` above ``path``) or the socket itself refusing us."""
    name, groups = user()
    head = f"permission denied on {path} (from {origin})"
    try:
        st = stat(denied)
    except OSError:
        fix = "ask the node's administrator which group may use the daemon's socket"
        return errors.Unavailable(
            f"{head}: {denied} cannot be read. Fix: {fix}", socket=path, origin=origin, reason="permission", fix=fix
        )
    group = _group_name(st.st_gid)
    mode = _stat.S_IMODE(st.st_mode)
    what = f"{denied} is mode {mode:04o}, owner {_owner_name(st.st_uid)}, group {group}"
    # A directory must let the group search it; the socket must let the group write (connect) to it.
    group_may = bool(mode & (_stat.S_IXGRP if _stat.S_ISDIR(st.st_mode) else _stat.S_IWGRP))
    if not group_may:
        problem = f"{head}: {what}, which gives its group no access"
        fix = (
            f"give the group access (`sudo chmod g+{'rx' if _stat.S_ISDIR(st.st_mode) else 'rw'} {denied}`); "
            f"the systemd unit makes them so itself (RuntimeDirectoryMode=0750, UMask=0007)"
        )
    elif st.st_gid in groups:
        problem = f"{head}: {what}, and user {name} is in that group"
        fix = "if the group was added in this session, log in again (or `newgrp " + group + "`)"
    elif st.st_gid == 0:
        # Operators paste "Fix:" lines: joining the root group would hand the user far more than this socket.
        problem = f"{head}: {what}, and user {name} is not in group {group}"
        directory = denied if _stat.S_ISDIR(st.st_mode) else os.path.dirname(denied)
        fix = (
            f"do not add {name} to group {group}; run the daemon under its systemd unit, whose sockets belong "
            f"to group hotweights (then `sudo usermod -aG hotweights {name}`), or give the socket's directory a "
            f"group of its own and restart the daemon (`sudo chgrp GROUP {directory} && sudo chmod g+s "
            f"{directory}`: sockets made there take its group), then add {name} to that group"
        )
    else:
        problem = f"{head}: {what}, and user {name} is not in group {group}"
        fix = f"`sudo usermod -aG {group} {name}`, then log in again (or `newgrp {group}` in this shell)"
    return errors.Unavailable(
        f"{problem}. Fix: {fix}", socket=path, origin=origin, reason="permission", fix=fix, group=group
    )
