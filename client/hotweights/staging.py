"""Writing a checkpoint directory all-or-nothing, for the tools that write one (``hotweights shard``, the
vLLM-layout converter).

Everything is written and fsynced in a hidden staging directory beside the output, renamed onto it at
the end; a failure, Ctrl-C or SIGTERM removes the staging directory, so the output never holds some of
the files, which a loader would take for a whole smaller checkpoint. File system only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from hotweights.errors import FailedPrecondition, HotweightsError, InvalidArgument, ResourceExhausted


def check_output(src: Path, out: Path, writer: str) -> None:
    """Refuses, before any work, an ``out`` that is not a new or empty directory outside ``src``.

    ``writer`` names the tool in the message ("hotweights shard")."""
    if out.is_symlink():
        # rename(2) does not follow a link: refused here, before the run, not after all of its work
        raise FailedPrecondition(
            f"{out}: is a symbolic link (to {os.readlink(out)}); give the directory itself as the output "
            f"(the finished output is renamed onto this path)",
            path=str(out),
        )
    if out.exists():
        if not out.is_dir():
            raise FailedPrecondition(f"{out}: exists and is not a directory", path=str(out))
        if any(out.iterdir()):
            raise FailedPrecondition(
                f"{out}: output directory is not empty; {writer} writes only into a new or empty directory",
                path=str(out),
            )
    resolved, source = out.resolve(), src.resolve()
    if resolved == source or source in resolved.parents:
        raise InvalidArgument(f"{out}: the output must not be the source directory or inside it", path=str(out))


@contextlib.contextmanager
def staged(out: Path, tag: str) -> Iterator[Path]:
    """A new staging directory beside ``out``, renamed onto ``out`` when the block ends; removed, and an
    OSError raised as a typed error, when it fails or is interrupted. ``tag`` names the writer in its name."""
    staging = out.parent / f".{out.name}.{tag}-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise io_error(exc, out) from None
    try:
        yield staging
        fsync(staging)
        _publish(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise io_error(exc, out) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def io_error(exc: OSError, out: Path) -> HotweightsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(
            f"no space left on the device writing {out} ({exc.strerror}); the run was "
            f"abandoned and its partial output removed",
            path=str(out),
        )
    return FailedPrecondition(
        f"cannot write {out}: {exc.strerror or exc}; the run was abandoned and its partial output removed",
        path=str(out),
    )


def _publish(staging: Path, out: Path) -> None:
    # rename(2) replaces an empty directory atomically; a non-empty one (someone wrote there meanwhile) fails.
    try:
        os.rename(staging, out)
    except OSError as exc:
        raise FailedPrecondition(
            f"{out}: cannot move the finished checkpoint into place: {exc.strerror}", path=str(out)
        ) from None
    fsync(out.parent)


def fsync(path: Path) -> None:
    """fsyncs a file or a directory."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is so that it unwinds (and removes its staging) as Ctrl-C does."""


@contextlib.contextmanager
def sigterm_unwinds(on_terminate: Callable[[], None] | None = None) -> Iterator[None]:
    """While the run writes, SIGTERM (a timeout, systemd, kubectl) unwinds it like Ctrl-C, so its staging
    directory is removed; ``on_terminate`` runs, and the signal is then delivered again under the handler
    it replaced, so the process still ends as SIGTERM ends it. Outside the main thread (where no handler
    can be set) nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    if previous is None:  # a handler set outside Python: the default is what remains to restore
        previous = signal.SIG_DFL
    try:
        yield
    except Terminated:
        if on_terminate is not None:
            on_terminate()
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
