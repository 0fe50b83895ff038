"""Where a client finds the daemon's sockets."""

from __future__ import annotations

import os

from hotweights.paths import fd_socket_beside


def test_the_fd_socket_is_found_beside_the_socket_the_client_reached(tmp_path):
    # The daemon names its fd socket by its own path (/run/hotweights); this client sees that folder
    # mounted at tmp_path/run, and reaches the gRPC socket through a symlink elsewhere.
    run = tmp_path / "run"
    run.mkdir()
    (run / "hotweights.sock").touch()
    link = tmp_path / "link.sock"
    os.symlink(run / "hotweights.sock", link)
    reported = "/run/hotweights/hotweights.sock.fds"
    assert fd_socket_beside(str(run / "hotweights.sock"), reported) == str(run / "hotweights.sock.fds")
    assert fd_socket_beside(str(link), reported) == str(run / "hotweights.sock.fds")
