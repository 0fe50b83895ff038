"""Where the daemon's socket is, by the rules every tool shares."""

from __future__ import annotations

import os

SYSTEM_SOCKET = "/run/hotweights/hotweights.sock"


def default_socket() -> str:
    """``$HOTWEIGHTS_SOCKET``; else the systemd socket when it exists (or we are root);
    else ``$XDG_RUNTIME_DIR/hotweights.sock``; else a per-user path under /tmp."""
    env = os.environ.get("HOTWEIGHTS_SOCKET")
    if env:
        return env
    if os.path.exists(SYSTEM_SOCKET) or os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "hotweights.sock")
    return f"/tmp/hotweights-{os.getuid()}/hotweights.sock"
