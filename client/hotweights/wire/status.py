"""The one table between hotweights errors and gRPC status codes, used in both directions.

The daemon aborts a call with :func:`abort_with`; the client rebuilds the same error class with
:func:`error_from_rpc`. The class name and details travel in trailing metadata so a client sees
``LeaseHeld``, not just FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from hotweights import errors as e

STATUS_OF: dict[type[e.HotweightsError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.DataLoss: grpc.StatusCode.DATA_LOSS,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.Aborted: grpc.StatusCode.ABORTED,
    e.Internal: grpc.StatusCode.INTERNAL,
    e.HotweightsError: grpc.StatusCode.UNKNOWN,
}
ERROR_OF: dict[grpc.StatusCode, type[e.HotweightsError]] = {v: k for k, v in STATUS_OF.items()}

CLASS_KEY = "hotweights-error-class"
DETAILS_KEY = "hotweights-error-details"
# Initial metadata of a Watch stream the daemon has subscribed: a refused stream ends with empty
# metadata, which alone cannot be told from a subscription until its status arrives.
SUBSCRIBED_KEY = "hotweights-subscribed"
# gRPC refuses (RESOURCE_EXHAUSTED, in place of the real status) a status whose message and metadata
# pass its header limit (16 KiB): what goes out stays below, whatever a client sent. The message
# travels percent-encoded (up to 3 bytes per UTF-8 byte), the details as ASCII JSON.
MAX_MESSAGE = 2000  # UTF-8 bytes
MAX_DETAILS = 6000  # characters of JSON
MAX_DETAIL = e.SHORT


def short_message(message: str) -> str:
    """``message`` whole if its UTF-8 form fits MAX_MESSAGE bytes, else a prefix that does and the length."""
    raw = message.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_MESSAGE:
        return message
    head = raw[: MAX_MESSAGE - 32].decode("utf-8", "ignore")
    return f"{head}…({len(raw)} bytes)"


def status_of(err: e.HotweightsError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


def _short_detail(value: Any) -> Any:
    if isinstance(value, str):
        return e.shorten(value, MAX_DETAIL)
    if isinstance(value, (list, tuple)):
        return [_short_detail(v) for v in value[:50]]
    if isinstance(value, dict):
        return {e.shorten(str(k), MAX_DETAIL): _short_detail(v) for k, v in list(value.items())[:50]}
    return value


def trailing_metadata(err: e.HotweightsError) -> tuple[tuple[str, str], ...]:
    details = json.dumps(_short_detail(err.details), default=lambda v: e.shorten(str(v), MAX_DETAIL))
    if len(details) > MAX_DETAILS:
        details = json.dumps({"truncated": True})
    return (
        (CLASS_KEY, type(err).__name__),
        (DETAILS_KEY, details),
    )


async def abort_with(context: Any, err: e.HotweightsError) -> None:
    """Ends an aio call with the error's status; never returns."""
    context.set_trailing_metadata(trailing_metadata(err))
    await context.abort(status_of(err), short_message(err.message))


def error_from_rpc(rpc_error: grpc.RpcError | ValueError) -> e.HotweightsError:
    """The hotweights error a failed call carried, or the closest class by status code.

    A call that failed in the transport rather than in the daemon comes back as ``Unavailable`` with
    ``transport=True``: UNAVAILABLE with no hotweights class (no daemon answered; the client probes
    the socket path to say why, ``hotweights.reach.diagnose_unreachable``), and CANCELLED with no
    hotweights class, which also carries ``cancelled=True``: this process cancelled the call (its
    ``cancel()``, its channel closing) or the daemon's gRPC layer did (a daemon stopping, a call it
    does not take); the caller knows whether it cancelled, and tells the two apart with it.

    It also takes the ``ValueError`` grpc raises for a call made on a closed channel (see
    :data:`CALL_ERRORS`): ``FailedPrecondition`` with ``closed_channel=True``.
    """
    if isinstance(rpc_error, ValueError):
        return _not_called(rpc_error)
    code = rpc_error.code() if hasattr(rpc_error, "code") else grpc.StatusCode.UNKNOWN
    message = rpc_error.details() if hasattr(rpc_error, "details") else str(rpc_error)
    meta = dict(rpc_error.trailing_metadata() or ()) if hasattr(rpc_error, "trailing_metadata") else {}
    cls = e.error_class(meta.get(CLASS_KEY, "")) or ERROR_OF.get(code, e.HotweightsError)
    details: dict[str, Any] = {}
    try:
        details = json.loads(meta.get(DETAILS_KEY, "{}"))
    except ValueError:
        pass
    if code == grpc.StatusCode.UNAVAILABLE and CLASS_KEY not in meta:
        # The transport failed, not the daemon: the client probes the socket path to say why
        # (hotweights.reach.diagnose_unreachable); ``transport`` marks the error for it.
        return e.Unavailable(f"hotweights daemon unreachable: {message}", transport=True, grpc_message=message)
    if code == grpc.StatusCode.CANCELLED and CLASS_KEY not in meta:
        # No daemon answer either: the call ended without one. The client says where (and which call).
        return e.Unavailable(
            f"the hotweights daemon cancelled the call ({message or 'no reason given'}); it may be shutting down",
            transport=True,
            cancelled=True,
            grpc_code=code.name,
            grpc_message=message or "",
        )
    err = cls.__new__(cls)
    e.HotweightsError.__init__(err, message or code.name, **details)
    for key in ("op", "code"):
        if key in details:
            setattr(err, key, details[key])
    return err


# What a call through a grpc channel raises: RpcError when the call failed, ValueError when the channel
# was closed before the call started ("Cannot invoke RPC: Channel closed!"). error_from_rpc takes both.
CALL_ERRORS: tuple[type[Exception], ...] = (grpc.RpcError, ValueError)


def _not_called(exc: ValueError) -> e.HotweightsError:
    """The error for a call grpc refused to start."""
    if "closed" in str(exc).lower():
        return e.FailedPrecondition(
            f"the connection to the daemon is closed: the client it belongs to was closed ({exc})",
            closed_channel=True,
            grpc_message=str(exc),
        )
    return e.Internal(f"grpc refused to start the call: {exc}", grpc_message=str(exc))
