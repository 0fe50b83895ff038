"""Real daemons on real unix sockets, and clients as separate processes: the tests' side of
hotweights.testing (which the demo and the benchmarks use too)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path

from hotweights import testing
from hotweights.testing import EMPTY_CONFIG, Daemon, serve_command, start_daemon, stop_process, wait_until
from support import CLIENTS, child_env

__all__ = [
    "EMPTY_CONFIG",
    "Daemon",
    "client_program",
    "run_client",
    "serve_command",
    "client_json",
    "short_tmpdir",
    "spawn_client",
    "start_daemon",
    "stop_process",
    "wait_for_socket",
    "wait_until",
]


def short_tmpdir() -> str:
    # unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer
    return tempfile.mkdtemp(prefix="hw-", dir="/tmp")


def wait_for_socket(d: Daemon, timeout: float = testing.START_TIMEOUT) -> None:
    """Returns once ``d`` answers (a daemon started elsewhere, e.g. by the service manager)."""
    d.wait_ready(timeout)


def client_program(name: str | os.PathLike) -> Path:
    """tests/clients/NAME (``.py`` optional), or NAME itself if it is a path to a file."""
    p = Path(name)
    if p.is_file():
        return p
    p = CLIENTS / (p.name if p.suffix == ".py" else p.name + ".py")
    if not p.is_file():
        raise FileNotFoundError(f"no client program {name!r} in {CLIENTS}")
    return p


def _argv(program: str | os.PathLike, args: tuple[str, ...]) -> list[str]:
    # A multi-line string is code (the older way some tests still write a client); anything else
    # names a program file.
    if isinstance(program, str) and "\n" in program:
        return [sys.executable, "-c", textwrap.dedent(program), *args]
    return [sys.executable, str(client_program(program)), *args]


def run_client(
    program: str | os.PathLike, *args: str, timeout: float = testing.CLI_TIMEOUT, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Runs a client program (tests/clients/NAME.py, or a path) in its own process to the end, with
    ``args`` as its argv and ``env`` added to its environment."""
    r = subprocess.run(_argv(program, args), capture_output=True, text=True, timeout=timeout, env=child_env(**env))
    if check and r.returncode != 0:
        raise AssertionError(f"client process failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = testing.CLI_TIMEOUT,
    module: str = "hotweights",
    **extra_env: str,
) -> subprocess.CompletedProcess:
    """Runs ``python -m MODULE ARGS`` (the CLI, or ``hotweightsd``) to the end, output captured as text.
    ``env`` replaces the environment (default: the tests' ``child_env``); ``extra_env`` is added to it."""
    base = dict(env) if env is not None else child_env()
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **extra_env},
    )


def client_json(program: str | os.PathLike, *args: str, timeout: float = testing.CLI_TIMEOUT, **env: str) -> dict:
    """Runs a client program to the end and returns the last JSON line it printed; a failed run, or one
    that printed none, is an AssertionError with its output."""
    r = run_client(program, *args, timeout=timeout, check=False, **env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0 and lines, f"{program} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(lines[-1])


def spawn_client(program: str | os.PathLike, *args: str, **env: str) -> subprocess.Popen:
    """Starts a client program with pipes (text); killed at the end of the test if still running."""
    proc = subprocess.Popen(
        _argv(program, args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**env),
    )
    what = "a client given as code" if isinstance(program, str) and "\n" in program else Path(program).name
    return testing.track(proc, f"client {what}")


def read_line(s: socket.socket, timeout: float = 60) -> bytes:
    """Bytes from ``s`` up to and including a newline; what came before the peer closed, if it did first."""
    s.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def fd_channel_answer(s: socket.socket, timeout: float = 60) -> dict | None:
    """The daemon's one JSON line on fd-channel connection ``s``, or None if it closed without one."""
    line = read_line(s, timeout)
    return json.loads(line) if line.endswith(b"\n") else None
