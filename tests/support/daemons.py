"""Real daemons on real unix sockets, and clients as separate processes: helpers for the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from support import stop_process

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    socket: str
    proc: subprocess.Popen
    log: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [sys.executable, "-m", "hotweights", *args, "--socket", self.socket],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"hotweights {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json", check=True).stdout)

    def wait_status(self, ready, timeout: float = 20) -> dict:
        """Polls ``status --json`` until ``ready(status)`` holds or ``timeout`` passes; the last status."""
        deadline = time.monotonic() + timeout
        st = self.status()
        while not ready(st) and time.monotonic() < deadline:
            time.sleep(0.1)
            st = self.status()
        return st

    def leases(self) -> list:
        """Live leases, asked in-process (fast enough to poll)."""
        import hotweights

        with hotweights.connect(self.socket) as c:
            return list(c.status().leases)

    def memfds(self) -> list[str]:
        """The daemon's open memfds, read from /proc: what it still holds."""
        out = []
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("/memfd:hotweights"):
                out.append(target)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        return stop_process(self.proc, sig, timeout)


def short_tmpdir() -> str:
    # unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer
    return tempfile.mkdtemp(prefix="hw-", dir="/tmp")


def start_daemon(
    socket: str, *extra: str, env: dict | None = None, log: Path | None = None, wait: bool = True
) -> Daemon:
    log = log or Path(socket).with_suffix(".log")
    cmd = [
        sys.executable,
        "-m",
        "hotweights",
        "serve",
        "--socket",
        socket,
        "--backend",
        "cpu",
        "--log-format",
        "json",
        *extra,
    ]
    fh = open(log, "ab")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    fh.close()
    d = Daemon(socket, proc, log, list(extra))
    if wait:
        wait_for_socket(d)
    return d


def wait_for_socket(d: Daemon, timeout: float = 20) -> None:
    import hotweights

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.logs()}")
        if os.path.exists(d.socket):
            try:
                hotweights.connect(d.socket).wait_ready(1.0).status()
                return
            except hotweights.HotweightsError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"daemon did not come up on {d.socket}:\n{d.logs()}")


def run_client(code: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new Python process (a separate client), with ``args`` as sys.argv[1:]."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"client process failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def spawn_client(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
