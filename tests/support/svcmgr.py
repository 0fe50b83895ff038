"""The service manager's side of systemd's protocol, emulated for tests.

What it does as systemd does: a datagram notify socket ($NOTIFY_SOCKET, a path or '@abstract'),
sender credentials checked against the main pid (NotifyAccess=main), an fd store filled by
FDSTORE=1/FDNAME= and emptied by FDSTOREREMOVE=1, capped at FileDescriptorStoreMax ($FDSTORE,
as systemd >= 254 sets it), WATCHDOG_USEC/WATCHDOG_PID, and on restart the stored fds handed back
from fd 3 with LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID. It does not enforce the watchdog or
timeouts: tests read ``messages`` and decide.
"""

from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hotweights import testing

from . import child_env, stop_process

_MAX_FDS = 253  # SCM_MAX_FD
_ANC_SIZE = socket.CMSG_SPACE(_MAX_FDS * 4) + socket.CMSG_SPACE(struct.calcsize("iII"))

_EXEC = Path(__file__).with_name("svc_exec.py")  # puts the stored fds at 3, 4, ... then execs


@dataclass(frozen=True)
class Message:
    fields: dict[str, str]  # a repeated key keeps its last value
    pid: int | None  # the sender, from SCM_CREDENTIALS
    nfds: int  # fds that came with the message
    at: float  # time.monotonic() when received


def _valid_fdname(name: str) -> bool:
    return 0 < len(name) <= 255 and all(" " <= c < "\x7f" and c != ":" for c in name)


class ServiceManager:
    """One service, its notify socket and its fd store. Use as a context manager."""

    def __init__(
        self,
        tmpdir: str | os.PathLike,
        *,
        fdstore_max: int = 4096,
        watchdog_usec: int | None = None,
        abstract: bool = False,
        notify_access: str = "main",
    ) -> None:
        self.tmpdir = Path(tmpdir)
        self.fdstore_max = fdstore_max
        self.watchdog_usec = watchdog_usec
        self.notify_access = notify_access
        self.process: subprocess.Popen | None = None
        self.errors: list[str] = []  # what systemd would log and refuse
        self._messages: list[Message] = []
        self._store: list[tuple[str, int]] = []
        self._cond = threading.Condition()
        self._since = 0  # index of the current process's first message
        self._main_pid: int | None = None
        self._cmd: list[str] = []
        self._env: dict[str, str] | None = None
        self._runs = 0
        self._log: Path | None = None
        self._closed = False

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"hotweights-test-{uuid.uuid4().hex}"
            self._sock.bind("\0" + name)
            self.notify_socket = "@" + name
            self._path = None
        else:
            self._path = self.tmpdir / "notify.sock"
            if len(bytes(self._path)) > 107:  # sun_path holds 108 bytes; pytest's tmp_path can be longer
                self._path = Path(tempfile.mkdtemp(prefix="hw-svcmgr-", dir="/tmp")) / "notify.sock"
            self._sock.bind(str(self._path))
            self.notify_socket = str(self._path)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._receive, name="svcmgr-notify", daemon=True)
        self._thread.start()

    # -- the notify socket ------------------------------------------------------------------

    def _receive(self) -> None:
        while not self._closed:
            try:
                data, anc, flags, _ = self._sock.recvmsg(65536, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                continue
            except OSError:
                return  # closed under us by close()
            fds, pid = [], None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            with self._cond:
                self._handle(data, flags, fds, pid)
                self._cond.notify_all()

    def _handle(self, data: bytes, flags: int, fds: list[int], pid: int | None) -> None:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self.errors.append(f"message from pid {pid} truncated (flags {flags:#x})")
        if self.notify_access == "main" and pid != self._main_pid:
            self.errors.append(
                f"message from pid {pid} ignored: NotifyAccess=main and the main pid is {self._main_pid}"
            )
            self._close(fds)
            return
        fields = {}
        for line in data.decode(errors="replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        self._messages.append(Message(fields, pid, len(fds), time.monotonic()))
        if fields.get("FDSTOREREMOVE") == "1":
            self._remove(fields.get("FDNAME"))
        if fds and fields.get("FDSTORE") == "1":
            self._keep(fields.get("FDNAME", "stored"), fds)
        elif fds:
            self.errors.append(f"{len(fds)} fds without FDSTORE=1 closed")
            self._close(fds)

    def _keep(self, name: str, fds: list[int]) -> None:
        if not _valid_fdname(name):
            self.errors.append(f"invalid FDNAME {name!r}: {len(fds)} fds closed")
            self._close(fds)
            return
        room = max(0, self.fdstore_max - len(self._store))
        if len(fds) > room:
            self.errors.append(
                f"fd store full (FileDescriptorStoreMax={self.fdstore_max}): "
                f"{len(fds) - room} of {len(fds)} fds named {name!r} closed"
            )
            self._close(fds[room:])
        self._store.extend((name, fd) for fd in fds[:room])

    def _remove(self, name: str | None) -> None:
        if name is None:
            self.errors.append("FDSTOREREMOVE=1 without FDNAME= ignored")
            return
        self._close([fd for n, fd in self._store if n == name])
        self._store = [(n, fd) for n, fd in self._store if n != name]

    @staticmethod
    def _close(fds: Sequence[int]) -> None:
        for fd in fds:
            os.close(fd)

    # -- what tests read ----------------------------------------------------------------------

    @property
    def messages(self) -> list[Message]:
        with self._cond:
            return list(self._messages)

    @property
    def stored_fds(self) -> dict[str, list[int]]:
        """The fd store by name, in the order stored (the manager's own fd numbers)."""
        with self._cond:
            out: dict[str, list[int]] = {}
            for name, fd in self._store:
                out.setdefault(name, []).append(fd)
            return out

    def put(self, name: str, fd: int) -> None:
        """Adds a dup of ``fd`` to the store as if the service had sent it (to test bad stores)."""
        with self._cond:
            self._store.append((name, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)))

    def remove(self, name: str) -> None:
        """Drops ``name`` from the store as `systemctl clean --what=fdstore` would, per name."""
        with self._cond:
            self._remove(name)

    @property
    def log_path(self) -> Path | None:
        """Where the current (or last) process's stdout and stderr go."""
        return self._log

    def output(self) -> str:
        """stdout and stderr of the current (or last) process."""
        return self._log.read_text(errors="replace") if self._log and self._log.exists() else ""

    def wait_for(self, field: str, value: str | None = None, timeout: float = 60.0) -> Message:
        """The first message of the current process with ``field`` (equal to ``value`` if given);
        raises TimeoutError with what did arrive, the exit status and the output otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self._messages[self._since :]:
                    if field in m.fields and (value is None or m.fields[field] == value):
                        return m
                if self.process is not None and self.process.poll() is not None:
                    # Its last datagrams may still be queued: a short grace, not the full timeout.
                    deadline = min(deadline, time.monotonic() + 0.5)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            seen = [m.fields for m in self._messages[self._since :]]
        want = field if value is None else f"{field}={value}"
        rc = self.process.poll() if self.process else None
        raise TimeoutError(
            f"no {want} from the service within {timeout}s (exit status {rc}); "
            f"messages: {seen}; refused: {self.errors}; output:\n{self.output()}"
        )

    # -- the service's process ----------------------------------------------------------------

    def start(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Starts ``cmd`` as the service, handing it the fd store from fd 3 (none at first)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the service (pid {self.process.pid}) is still running; stop it first")
        self._cmd, self._env = list(cmd), env
        env = dict(child_env() if env is None else env)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC", "FDSTORE"):
            env.pop(key, None)
        env["NOTIFY_SOCKET"] = self.notify_socket
        if self.fdstore_max > 0:
            env["FDSTORE"] = str(self.fdstore_max)
        if self.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
            env["_SVCMGR_WATCHDOG"] = "1"
        self._runs += 1
        self._log = self.tmpdir / f"service-{self._runs}.log"
        with self._cond:
            stored = list(self._store)
            env["_SVCMGR_FDS"] = ",".join(str(fd) for _, fd in stored)
            env["_SVCMGR_FDNAMES"] = ":".join(name for name, _ in stored)
            with open(self._log, "wb") as log:
                # Under the lock: the receiver must not judge a first message before it knows
                # the main pid.
                self.process = subprocess.Popen(
                    [sys.executable, str(_EXEC), *cmd],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=[fd for _, fd in stored],
                )
            self._main_pid = self.process.pid
            testing.track(self.process, "service under the emulated service manager")
            self._since = len(self._messages)
        return self.process

    def restart(self, cmd: Sequence[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Stops the service if it runs (SIGTERM) and starts ``cmd`` (default: the last command)
        with the stored fds; the store keeps them, as systemd's does."""
        if self.process is not None and self.process.poll() is None:
            self.stop()
        return self.start(cmd or self._cmd, env if env is not None else self._env)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = testing.STOP_TIMEOUT) -> int:
        """Signals the service and waits; SIGKILL after ``timeout``. Returns the exit status."""
        if self.process is None:
            raise RuntimeError("no service was started")
        return stop_process(self.process, sig, timeout)

    def close(self) -> None:
        if self._closed:
            return
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)
        self._closed = True
        self._thread.join()
        self._sock.close()
        with self._cond:
            self._close([fd for _, fd in self._store])
            self._store = []
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            if self._path.parent != self.tmpdir:
                self._path.parent.rmdir()

    def __enter__(self) -> ServiceManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hand_over_fds(manager, persister, keys) -> dict[str, list[int]]:
    """What a service manager would hand a restarted daemon for the versions ``keys`` of ``manager``:
    each version's exported fds under the names the persister stores them by (told to ``persister``)."""
    from hotweightsd.persist.fdstore import fd_name

    received: dict[str, list[int]] = {}
    for key in keys:
        fds = manager.export_fds(key)
        persister.adopted(key, [fd_name(key, r, i) for r, i, _ in fds])
        for r, i, fd in fds:
            received[fd_name(key, r, i)] = [fd]
    return received
