"""Where the daemon's socket is, by the rules every tool shares."""

from __future__ import annotations

import os
from collections.abc import Mapping

SYSTEM_SOCKET = "/run/hotweights/hotweights.sock"


def socket_for(env: Mapping[str, str]) -> str:
    """The socket by the shared rules, reading only ``env``: ``HOTWEIGHTS_SOCKET``; else the systemd
    socket when it exists (or we are root); else ``$XDG_RUNTIME_DIR/hotweights.sock``; else a
    per-user path under /tmp. The daemon passes the environment its config read."""
    named = env.get("HOTWEIGHTS_SOCKET")
    if named:
        return named
    if os.path.exists(SYSTEM_SOCKET) or os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "hotweights.sock")
    return f"/tmp/hotweights-{os.getuid()}/hotweights.sock"


def default_socket() -> str:
    """The socket a client connects to when it names none: ``socket_for`` this process's environment."""
    return socket_for(os.environ)


def fd_socket_beside(socket: str, reported: str) -> str:
    """The daemon's fd socket as this process reaches it. The daemon names it by its own path, always
    beside its gRPC socket; a client that sees the daemon's runtime directory mounted elsewhere (a
    container, a private /run) finds it beside the socket it connected to instead."""
    return os.path.join(os.path.dirname(os.path.realpath(socket)), os.path.basename(reported))


# The metrics socket's setting: AUTO derives it from the daemon's socket; OFF (or empty) serves none.
METRICS_AUTO = "auto"
METRICS_OFF = ("off", "none", "")


def metrics_socket_for(socket: str, setting: str = METRICS_AUTO) -> str | None:
    """Where the daemon on ``socket`` serves its Prometheus text over HTTP: ``<socket>.metrics`` by
    default, ``setting`` when it names a path, None when metrics are off. The daemon and
    ``hotweights metrics`` both derive it here."""
    text = setting.strip()
    if text.lower() in METRICS_OFF:
        return None
    if text.lower() == METRICS_AUTO:
        return socket + ".metrics"
    return text


# The operator socket's setting: AUTO derives it from the daemon's socket.
OPERATOR_AUTO = "auto"


def operator_socket_for(socket: str, setting: str = OPERATOR_AUTO) -> str:
    """Where the daemon on ``socket`` takes operator calls (load, unload, swap, alias):
    ``<socket>.admin`` by default, ``setting`` when it names a path. The daemon and the client
    both derive it here."""
    text = setting.strip()
    if not text or text.lower() == OPERATOR_AUTO:
        return socket + ".admin"
    return text
