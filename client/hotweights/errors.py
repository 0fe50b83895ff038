"""Typed errors shared by the daemon core and the client library.

The daemon raises these; ``hotweights.wire.status`` turns them into gRPC statuses and the client
turns the statuses back into the same classes, so library users catch what the core raised.
This module imports nothing from gRPC: the core uses it without a transport.
"""

from __future__ import annotations

from typing import Any


class HotweightsError(Exception):
    """Base of every error hotweights raises on purpose."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        return self.message


class InvalidArgument(HotweightsError):
    """The request itself is malformed (a bad name, a bad option)."""


class BadCheckpoint(InvalidArgument):
    """A checkpoint file or directory is malformed: the message names the file and the problem."""


class BindError(InvalidArgument):
    """Attached tensors do not fit a module: the message names every missing, unexpected, mis-shaped and
    mis-typed tensor; details carry them as lists."""


class NotFound(HotweightsError):
    """A model, version, alias, path or lease does not exist."""


class AlreadyExists(HotweightsError):
    """A model version or alias of that name exists already."""


class ContentMismatch(AlreadyExists):
    """A load names a version that is already loaded from different content; the message names the
    loaded version and what differs (details: ``ref``, ``source``, ``differences``)."""


class FailedPrecondition(HotweightsError):
    """The request is valid but the current state forbids it (e.g. unloading a leased model)."""


class LeaseHeld(FailedPrecondition):
    """Live leases point at the memory the request would free."""


class ResourceExhausted(HotweightsError):
    """Admission control refused the request: it would not fit."""


class InsufficientMemory(ResourceExhausted):
    """Not enough device or host memory; details carry ``needed`` and ``free`` in bytes."""


class PermissionDenied(HotweightsError):
    """The caller may not do this (an invalid, reused or expired ticket; another process's lease; a reader
    asking to load)."""


class OperatorRequired(PermissionDenied):
    """The call needs the operator role and came in on the readers' socket (or the caller may not
    open the operator socket); details carry ``rpc`` and ``operator_socket``."""


class TicketInvalid(PermissionDenied):
    """A handle ticket is unknown, already used or expired."""


class OutsideModelRoots(PermissionDenied):
    """A checkpoint path (or where one of its links leads) is outside the daemon's model roots;
    details carry ``path`` and ``roots``."""


class DataLoss(HotweightsError):
    """Stored data does not match its manifest: a size or checksum differs."""


class ChecksumMismatch(DataLoss):
    """A file's hash does not match the manifest; details name the file."""


class Unavailable(HotweightsError):
    """The daemon cannot be reached, or is shutting down."""


class DaemonAlreadyRunning(Unavailable):
    """Another live daemon owns the socket."""


class FdChannelBusy(Unavailable):
    """The daemon's fd socket is serving as many connections as it takes: try again shortly."""


class DeadlineExceeded(HotweightsError):
    """A wait (drain, load, an exchange on the fd socket) ran past its timeout."""


class Aborted(HotweightsError):
    """The operation was interrupted by a concurrent change (unload during load, shutdown)."""


class Internal(HotweightsError):
    """A bug or an unexpected failure in the daemon."""


class BackendError(Internal):
    """A memory backend call failed; ``op`` and ``code`` name the call and its result."""

    def __init__(self, op: str, code: int | str, message: str | None = None, **details: Any) -> None:
        super().__init__(message or f"{op} failed with {code}", op=op, code=code, **details)
        self.op = op
        self.code = code


class CudaError(BackendError):
    """A CUDA driver call returned an error; ``code`` is the driver's CUresult value."""


class InjectedFault(Internal):
    """A failure the daemon's fault plan (config key ``faults``) caused on purpose; exists only for tests
    of failure paths (details: ``point``, ``check``). A daemon with no plan never raises it."""


SHORT = 200


def shorten(value: object, limit: int = SHORT) -> str:
    """A client-supplied string as an error message may quote it: whole when short, else its first
    ``limit`` characters and its length, so a huge name never comes back (or overflows a status)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text.encode('utf-8', 'surrogatepass'))} bytes)"


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_class(name: str) -> type[HotweightsError] | None:
    """The error class of that name, for rebuilding an error that crossed the wire."""
    if name == HotweightsError.__name__:
        return HotweightsError
    for cls in _all_subclasses(HotweightsError):
        if cls.__name__ == name:
            return cls
    return None
