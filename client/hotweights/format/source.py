"""Opening a checkpoint's files once, so that the file checked is the file read.

``open_file`` opens a path with ``O_PATH`` (which never blocks, whatever the path names), accepts
only a regular file, resolves the file's real path from its descriptor and lets the caller refuse
it (model roots), then reopens that same inode read-only through ``/proc/self/fd``. Everything
after it (headers, content identity, the fill, O_DIRECT reads) goes through the ``SourceFile``:
swapping a symlink or renaming a file after the open changes nothing that is read.

``FileBudget`` bounds how many files one checkpoint may hold open; going past it, or running into
the process's descriptor limit, closes every file it opened and raises ``ResourceExhausted``.
"""

from __future__ import annotations

import errno
import os
import pwd
import shlex
import stat
from collections.abc import Callable
from pathlib import Path

from hotweights.errors import BadCheckpoint, NotFound, ResourceExhausted, shorten

# Given a path and its real path, refuses it by raising (model roots); None allows every path.
Allow = Callable[[str, str], None]

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}

DEFAULT_MAX_FILES = 4096


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class SourceFile:
    """One regular file opened read-only, with what was checked when it was opened.

    ``path`` is the path as given, ``real`` the file's real path (links resolved) when it was opened,
    ``stat`` the fstat of the open file.
    ``reopen`` gives a new descriptor of the same inode (optionally O_DIRECT), never a path lookup.
    """

    def __init__(self, fd: int, path: str, real: str, st: os.stat_result) -> None:
        self.fd = fd
        self.path = path
        self.real = real
        self.stat = st

    @property
    def size(self) -> int:
        return self.stat.st_size

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def reopen(self, direct: bool = False) -> int:
        """A new descriptor of this file (the caller closes it); OSError as the kernel raised it
        (EINVAL for O_DIRECT on a filesystem that refuses it)."""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        if direct:
            flags |= os.O_DIRECT
        return os.open(_proc(self.fd), flags)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a backstop for callers that drop a file unclosed
        try:
            self.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"SourceFile({self.real!r}, fd={self.fd})"


def open_file(path: str | os.PathLike, allow: Allow | None = None) -> SourceFile:
    """Opens ``path`` as a regular file without ever blocking on it (a FIFO, a device).

    Raises NotFound (no such file), BadCheckpoint (not a regular file, or unreadable, naming the
    file and what it is), ResourceExhausted (out of descriptors), or what ``allow`` raises for the
    file's real path (a symlink that leads out of the model roots is judged by where it leads).
    """
    where = shorten(os.fspath(path))
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{where}: no such file", path=where) from None
    except OSError as exc:
        raise open_error(os.fspath(path), exc) from None
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise BadCheckpoint(
                f"{where}: {kind_of(st.st_mode)}, not a regular file", path=where, kind=kind_of(st.st_mode)
            )
        real = os.readlink(_proc(pfd))
        if allow is not None:
            allow(where, real)
        try:
            fd = os.open(_proc(pfd), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise open_error(os.fspath(path), exc) from None
    finally:
        os.close(pfd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return SourceFile(fd, os.fspath(path), real, st)


# Who opens the files, as errors name it. The daemon names itself at start: its errors reach an
# operator, often root, who can read the file and would not otherwise see whose access is missing.
_reader = "this process"


def name_reader(name: str) -> None:
    global _reader
    _reader = name


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def open_error(path: str, exc: OSError) -> Exception:
    """An open's OSError as the typed error: ResourceExhausted when out of descriptors, else BadCheckpoint.

    ``path`` whole: the message's head shortens it, but a command meant to be pasted gets it entire and
    shell-quoted (a shortened or space-split path would act on some other file, or none)."""
    where = shorten(path)
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ResourceExhausted(
            f"{where}: cannot open: out of file descriptors ({exc.strerror})", path=where, errno=exc.errno
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        user = _user()
        if os.geteuid() == 0:
            # Root passes every permission bit and ACL, so an ACL for root changes nothing: the refusal is
            # the filesystem's own, or a security module's.
            return BadCheckpoint(
                f"{where}: cannot open: {exc.strerror}: {_reader} runs as root, and the filesystem refuses "
                f"root (NFS with root_squash maps root to nobody; a FUSE mount without allow_other lets in "
                f"only the user who mounted it; or SELinux/AppArmor denies it); make it world-readable, "
                f"export or mount it for root (no_root_squash, allow_other), or run {_reader} as a user it "
                f"lets read",
                path=where,
                user=user,
            )
        return BadCheckpoint(
            f"{where}: cannot open: {exc.strerror}: {_reader} runs as user {user}, who may not read it; make it "
            f"group- or world-readable, or `setfacl -m u:{user}:r {shlex.quote(path)}` (its directories must let "
            f"{user} through too: `setfacl -m u:{user}:x DIR`)",
            path=where,
            user=user,
        )
    return BadCheckpoint(f"{where}: cannot open: {exc.strerror}", path=where)


def read_small(path: str | os.PathLike, allow: Allow | None = None, limit: int = 64 * 1024 * 1024) -> bytes:
    """The whole of a small side file (an index, a manifest) through ``open_file``."""
    with open_file(path, allow) as f:
        if f.size > limit:
            where = shorten(os.fspath(path))
            raise BadCheckpoint(f"{where}: {f.size} bytes, more than the {limit}-byte limit", path=where)
        out = bytearray()
        while len(out) < f.size:
            chunk = f.pread(f.size - len(out), len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)


class FileBudget:
    """The files one checkpoint holds open, at most ``limit``; ``close_all`` closes every one of them."""

    def __init__(self, what: str, limit: int = DEFAULT_MAX_FILES, allow: Allow | None = None) -> None:
        self.what = what
        self.limit = limit
        self.allow = allow
        self.files: list[SourceFile] = []

    def reserve(self, n: int) -> None:
        """Refuses up front a checkpoint that names more than ``limit`` files."""
        if len(self.files) + n > self.limit:
            self.close_all()
            raise self._exhausted(len(self.files) + n)

    def open(self, path: str | Path) -> SourceFile:
        if len(self.files) >= self.limit:
            self.close_all()
            raise self._exhausted(self.limit + 1)
        try:
            f = open_file(path, self.allow)
        except BaseException:
            self.close_all()
            raise
        self.files.append(f)
        return f

    def close_all(self) -> None:
        files, self.files = self.files, []
        for f in files:
            f.close()

    def _exhausted(self, n: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"{self.what}: has {n} files to open; the limit is {self.limit} (max_checkpoint_files)",
            path=self.what,
            files=n,
            limit=self.limit,
        )
