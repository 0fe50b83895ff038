"""A daemon that cannot make one of its paths says which and why in one line, and exits 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hotweights import testing
from hotweights.testing import serve_command
from support import child_env


def _serve(*args: str) -> subprocess.CompletedProcess:
    cmd = serve_command(*args, config="none")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=testing.START_TIMEOUT, env=child_env())


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("socket", "cannot create {file}: a file is in the way of the directory"),
        ("metrics", "cannot create {file}/m.sock: Not a directory"),
        ("operator", "cannot create /proc/hotweights-op.sock: gRPC could not bind a socket there"),
    ],
)
def test_a_path_the_daemon_cannot_make_is_one_line_and_exit_2(sockdir: Path, where: str, expected: str):
    file = sockdir / "f"
    file.write_text("")  # a file where a directory is needed: fails for any user, root included
    sock = str(sockdir / "s.sock")
    args = {
        "socket": (str(file / "s.sock"),),
        "metrics": (sock, "--metrics-socket", str(file / "m.sock")),
        # a directory that exists where no one may make a socket
        "operator": (sock, "--operator-socket", "/proc/hotweights-op.sock"),
    }[where]
    r = _serve(*args)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("hotweights serve:")]
    assert len(errors) == 1 and expected.format(file=file) in errors[0], r.stderr
    assert "(running as user " in errors[0]
    assert "Traceback" not in r.stderr
