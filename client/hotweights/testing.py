"""One way to run a real daemon as a child process: for the tests, the demo and the benchmarks.

``Daemon.start`` runs ``hotweights serve`` on a unix socket, waits until it answers a Status call and
fails with the daemon's own log if it exits or does not come up. Every child started here is
remembered until it is stopped, and whatever is still running when the interpreter exits is
killed, so a failing caller never leaves a daemon behind. Needs neither pytest nor torch.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hotweights.paths import operator_socket_for

T = TypeVar("T")

# Generous on purpose: a 2-core machine under load imports grpc slowly and schedules late.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0
WAIT_TIMEOUT = 30.0
# The daemon's call, load and drain pools' workers, by the names its threads carry at the OS level
# (hotweightsd.threadnames; hotweightsd.server.service names the pools).
POOL_WORKER = re.compile(r"^hw-(call|load|drain)_\d+$")


def fd_targets(pid: int | str = "self") -> list[str]:
    """What each open descriptor of process ``pid`` names (a path, ``socket:[…]``, ``/memfd:…``), read
    from /proc; one closed while listing is left out."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            continue  # closed while listing
    return out


def fds_under(root: str | os.PathLike, pid: int | str = "self") -> list[str]:
    """The paths under ``root`` that open descriptors of ``pid`` name, sorted, one per descriptor: what a
    leak check compares, where a count of every descriptor would move with what else the process closes."""
    return sorted(t for t in fd_targets(pid) if t.startswith(str(root)))


class _EmptyConfig:
    def __repr__(self) -> str:
        return "EMPTY_CONFIG"


EMPTY_CONFIG: Any = _EmptyConfig()
"""``config=`` default: the daemon reads no config file (``--config none``), never the host's /etc/hotweights."""


# -- waiting ----------------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = WAIT_TIMEOUT,
    what: str = "the condition",
    *,
    interval: float = 0.05,
    context: Callable[[], object] | None = None,
) -> T:
    """Polls ``condition()`` until it returns something true, and returns that. After ``timeout``
    seconds raises AssertionError naming ``what``, the last value seen and ``context()``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {value!r}{extra}")
        time.sleep(min(interval, left))


def read_line(
    proc: subprocess.Popen,
    timeout: float = START_TIMEOUT,
    what: str = "a line",
    *,
    context: Callable[[], object] | None = None,
) -> Any:
    """The next line ``proc`` writes to its stdout (a pipe), waiting at most ``timeout`` seconds (by
    default as long as a child's start may take: a first line follows its imports). Where
    none comes (the child ended, or is still silent after ``timeout``: it is then killed, as it hangs)
    raises AssertionError naming ``what``, with the child's exit status, its stderr where that is a
    pipe, and ``context()`` (a daemon's log, say)."""
    assert proc.stdout is not None, "read_line needs the child's stdout as a pipe"
    stdout = proc.stdout
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True, name="read_line")
    reader.start()
    reader.join(timeout)
    if got and got[0]:
        return got[0]
    why = "it ended first" if got else f"none came in {timeout:g} s"
    if proc.poll() is None:
        proc.kill()
    try:
        status = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        status = None
    err: Any = ""
    if proc.stderr is not None:
        chunks: list[Any] = []
        drain = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        drain.start()
        drain.join(STOP_TIMEOUT)
        err = chunks[0] if chunks else "(its stderr stayed open)"
    extra = f"\n{context()}" if context is not None else ""
    raise AssertionError(f"waited for {what} from pid {proc.pid}: {why} (exit status {status}); stderr:\n{err}{extra}")


# -- child processes ----------------------------------------------------------------------------------

_lock = threading.Lock()
_children: dict[int, tuple[subprocess.Popen, str]] = {}


def track(proc: subprocess.Popen, what: str) -> subprocess.Popen:
    """Remembers ``proc`` until ``untrack``; ``kill_leftovers`` (and interpreter exit) kills it."""
    with _lock:
        _children[proc.pid] = (proc, what)
    return proc


def untrack(proc: subprocess.Popen) -> None:
    with _lock:
        _children.pop(proc.pid, None)


def tracked() -> dict[int, str]:
    """The children started here and not stopped yet, running or not: pid -> what it is."""
    with _lock:
        return {pid: what for pid, (_, what) in _children.items()}


def kill_leftovers(pids: Sequence[int] | None = None) -> dict[int, str]:
    """Kills the tracked children (those in ``pids``, or all) that still run, and forgets them all.
    Returns the ones that were still running: pid -> what it was."""
    with _lock:
        chosen = [pid for pid in _children if pids is None or pid in pids]
        procs = [_children.pop(pid) for pid in chosen]
    killed = {}
    for proc, what in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            killed[proc.pid] = what
    return killed


atexit.register(kill_leftovers)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Signals ``proc`` if it runs and waits; SIGKILL after ``timeout``. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    untrack(proc)
    return proc.returncode


def source_dirs() -> list[str]:
    """The folders that hold the ``hotweights`` and ``hotweightsd`` packages this process imports."""
    dirs = [str(Path(__file__).resolve().parents[1])]
    spec = importlib.util.find_spec("hotweightsd")  # found, not imported: the client never imports the daemon
    if spec is not None and spec.origin:
        daemon_dir = str(Path(spec.origin).resolve().parents[1])
        if daemon_dir not in dirs:
            dirs.append(daemon_dir)
    return dirs


def child_env(
    extra: Mapping[str, str] | None = None, *, paths: Sequence[str] = (), base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (default os.environ) for a child Python process that imports the same packages as
    this one: their folders and ``paths`` first on PYTHONPATH; ``extra`` added last."""
    env = dict(os.environ if base is None else base)
    front = [*paths, *source_dirs()]
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in front]
    env["PYTHONPATH"] = os.pathsep.join(front + rest)
    env.update(extra or {})
    return env


def python(
    program: str | os.PathLike,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Runs ``python PROGRAM ARGS`` to the end; with ``check``, a non-zero exit raises AssertionError
    with its output."""
    r = _run([sys.executable, os.fspath(program), *args], timeout, env, input)
    if check and r.returncode != 0:
        raise AssertionError(f"{program} {' '.join(args)} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def _run(
    argv: list[str], timeout: float, env: Mapping[str, str] | None, input: str | None = None
) -> subprocess.CompletedProcess:
    """``argv`` to the end, output captured as text; ``env`` replaces the environment, by default ``child_env()``."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=dict(env) if env is not None else child_env(),
    )


# -- the daemon ------------------------------------------------------------------------------------------


def serve_command(
    socket: str,
    *extra: str,
    backend: str = "cpu",
    config: str | os.PathLike | None = None,
    log_format: str = "json",
) -> list[str]:
    """``python -m hotweights serve`` on ``socket``; ``extra`` flags win over the defaults given here
    (a ``--backend`` in ``extra`` replaces ``backend``, and so on)."""
    cmd = [sys.executable, "-m", "hotweights", "serve", "--socket", socket]
    for flag, value in (("--backend", backend), ("--log-format", log_format), ("--config", config)):
        if value is not None and flag not in extra:
            cmd += [flag, os.fspath(value)]
    return cmd + list(extra)


class Daemon:
    """A daemon process serving on ``socket``; its output goes to ``log``. Use as a context manager,
    or call ``stop()`` in a finally."""

    def __init__(
        self,
        socket: str,
        proc: subprocess.Popen,
        log: str | os.PathLike,
        args: Sequence[str] = (),
    ) -> None:
        self.socket = str(socket)
        self.proc = proc
        self.log = Path(log)
        self.args = list(args)

    @classmethod
    def start(
        cls,
        socket: str | os.PathLike,
        *extra: str,
        backend: str = "cpu",
        config: Any = EMPTY_CONFIG,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        log: str | os.PathLike | None = None,
        wait: bool = True,
        timeout: float = START_TIMEOUT,
    ) -> Daemon:
        """Starts ``hotweights serve`` and, with ``wait``, returns once it answers Status.

        ``config``: EMPTY_CONFIG (no file at all, so the host's /etc/hotweights is never read), a
        path, or None to let the daemon find its own. ``env`` replaces the environment entirely;
        by default the daemon gets ``child_env(extra_env)``. A daemon that exits or stays silent
        for ``timeout`` seconds is killed and reported with its log (AssertionError).
        """
        socket = os.fspath(socket)
        log = Path(log) if log is not None else Path(socket).with_suffix(".log")
        if config is EMPTY_CONFIG:
            config = None if "--config" in extra else "none"
        cmd = serve_command(socket, *extra, backend=backend, config=config)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else child_env(extra_env),
            )
        track(proc, f"daemon on {socket}")
        daemon = cls(socket, proc, log, extra)
        if wait:
            try:
                daemon.wait_ready(timeout)
            except BaseException:
                daemon.stop(signal.SIGKILL)
                raise
        return daemon

    # -- state ----------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def operator_socket(self) -> str:
        """Where it takes load, unload, swap and alias: its ``--operator-socket``, else ``<socket>.admin``."""
        named = self.args[self.args.index("--operator-socket") + 1] if "--operator-socket" in self.args[:-1] else ""
        return operator_socket_for(self.socket, named)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _answers(self) -> bool:
        import hotweights

        if self.proc.poll() is not None:
            raise AssertionError(f"daemon on {self.socket} exited with {self.proc.returncode}:\n{self.logs()}")
        if not os.path.exists(self.socket):
            return False
        try:
            with hotweights.connect(self.socket, timeout=5.0) as c:
                c.wait_ready(1.0).status()
            return True
        except hotweights.HotweightsError:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Returns once the daemon answers Status; raises AssertionError with its log if it exits
        first or ``timeout`` passes."""
        wait_until(
            self._answers,
            timeout,
            f"the daemon (pid {self.pid}) to answer on {self.socket}",
            context=lambda: f"its log:\n{self.logs()}",
        )
        return self

    def connect(self, timeout: float = 10.0):
        """An in-process client of this daemon (close it, or use it in a ``with``)."""
        import hotweights

        return hotweights.connect(self.socket, timeout=timeout)

    # -- asking it --------------------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = False, timeout: float = CLI_TIMEOUT, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """``hotweights ARGS --socket SOCKET`` as an operator runs it, in its own process."""
        r = _run([sys.executable, "-m", "hotweights", *args, "--socket", self.socket], timeout, env)
        if check and r.returncode != 0:
            raise AssertionError(f"hotweights {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def status(self) -> dict:
        """``hotweights status --json``, parsed."""
        return json.loads(self.cli("status", "--json", check=True).stdout)

    def wait_status(self, ready: Callable[[dict], object], timeout: float = WAIT_TIMEOUT) -> dict:
        """Polls ``status()`` until ``ready(status)`` holds and returns that status; AssertionError
        with the last status after ``timeout``."""
        last: list[dict] = []

        def check() -> dict | None:
            st = self.status()
            last[:] = [st]
            return st if ready(st) else None

        return wait_until(check, timeout, "a daemon status that satisfies the test", context=lambda: last)

    def leases(self) -> list:
        """Live leases, asked in-process (cheap enough to poll)."""
        with self.connect() as c:
            return list(c.status().leases)

    def fds(self) -> list[str]:
        """What each of the daemon's open descriptors names (``fd_targets``)."""
        return fd_targets(self.pid)

    def memfds(self) -> list[str]:
        """The daemon's open memfds, read from /proc: what it still holds."""
        return [t for t in self.fds() if t.startswith("/memfd:hotweights")]

    def memfd_mappings(self) -> int:
        """How many of the daemon's mappings are of a memfd, read from /proc/<pid>/maps."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum("memfd:" in line for line in f)

    def threads(self, pools: bool = False) -> int:
        """The daemon's threads, read from /proc/<pid>/task. Without ``pools``, the workers of its call,
        load and drain pools (``hw-call_N``/``hw-load_N``/``hw-drain_N`` there) are left out: a pool
        keeps the workers it started, and starts one more whenever a call comes before an idle one has
        said so, so their number says nothing about a leak. Threads a load starts carry their own names and count."""
        names = []
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except FileNotFoundError:  # ended meanwhile
                continue
        return sum(1 for n in names if pools or not POOL_WORKER.match(n))

    # -- ending it -------------------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signals the daemon and waits (SIGKILL after ``timeout``); returns its exit status."""
        return stop_process(self.proc, sig, timeout)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Daemon(socket={self.socket!r}, pid={self.pid}, alive={self.alive()})"


def start_daemon(socket: str | os.PathLike, *extra: str, **options: Any) -> Daemon:
    """``Daemon.start``."""
    return Daemon.start(socket, *extra, **options)
