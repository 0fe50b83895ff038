"""The gRPC outcomes the client meets outside a daemon's own errors (a cancelled call, a closed channel)
map to typed errors in wire/status.py alone, and the Watch and the lease branch on those types."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

import hotweights
from hotweights import errors
from hotweights.attach import LeaseStream
from hotweights.client import Watch
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import CALL_ERRORS, CLASS_KEY, DETAILS_KEY, error_from_rpc
from support.stub_server import serving


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


CLOSED = ValueError("Cannot invoke RPC: Channel closed!")  # what grpc raises for a call on a closed channel


def test_a_cancelled_call_is_a_transport_unavailable_marked_cancelled():
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.CANCELLED, "the server cancelled it"))
    assert type(err) is errors.Unavailable
    assert err.details["transport"] and err.details["cancelled"]
    assert err.details["grpc_code"] == "CANCELLED" and err.details["grpc_message"] == "the server cancelled it"
    assert "cancelled" in str(err) and "the server cancelled it" in str(err)


def test_unavailable_is_transport_but_not_cancelled():
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connect failed"))
    assert isinstance(err, errors.Unavailable) and err.details["transport"]
    assert "cancelled" not in err.details


def test_a_cancelled_status_with_a_hotweights_class_keeps_the_class():
    trailing = ((CLASS_KEY, "Aborted"), (DETAILS_KEY, '{"ref": "m@v1"}'))
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.CANCELLED, "unloaded meanwhile", trailing))
    assert type(err) is errors.Aborted and err.details == {"ref": "m@v1"}


def test_a_call_on_a_closed_channel_is_failed_precondition():
    assert issubclass(ValueError, CALL_ERRORS) and issubclass(grpc.RpcError, CALL_ERRORS)
    err = error_from_rpc(CLOSED)
    assert isinstance(err, errors.FailedPrecondition) and err.details["closed_channel"]
    assert "closed" in str(err)


def test_a_call_on_a_really_closed_channel_maps_the_same():
    channel = grpc.insecure_channel("unix:/nonexistent/hw.sock")
    channel.close()
    with pytest.raises(CALL_ERRORS) as info:
        next(iter(channel.unary_stream("/hotweights.v1.Hotweights/Watch")(b"")))
    err = error_from_rpc(info.value)
    assert isinstance(err, errors.FailedPrecondition) and err.details["closed_channel"]


# ---- the lease's re-lease after its stream broke -------------------------------------------------


class FakeLeaseCall:
    """A Lease call: answers the grant (or raises ``fail``), then raises ``end``, or else ends once the
    lease sends its release, as the daemon's stream does."""

    def __init__(self, requests, fail: BaseException | None = None, end: BaseException | None = None) -> None:
        self.requests, self.fail, self.end, self.granted = requests, fail, end, False

    def __iter__(self) -> Iterator[pb.LeaseEvent]:
        return self

    def __next__(self) -> pb.LeaseEvent:
        if not self.granted:
            self.granted = True
            if self.fail is not None:
                raise self.fail
            return pb.LeaseEvent(granted=pb.LeaseGranted(lease_id="l", name="m", version="v1"))
        if self.end is not None:
            raise self.end
        for _ in self.requests:  # the open, then the release once the lease is released
            pass
        raise StopIteration

    def cancel(self) -> None:
        pass


class FakeStub:
    """``Lease`` answers from ``opens``: a BaseException fails that open, anything else is a granted call.
    The first open (the attach) is granted, and its stream then breaks as a daemon restart breaks it."""

    def __init__(self, opens: list[BaseException | None]) -> None:
        self.opens = opens
        self.calls: list[FakeLeaseCall] = []

    def Lease(self, requests):
        if not self.calls:
            call = FakeLeaseCall(requests, end=FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
        else:
            step = self.opens.pop(0) if self.opens else None
            if isinstance(step, ValueError):
                raise step  # grpc refuses to start a call on a closed channel
            call = FakeLeaseCall(requests, fail=step)
        self.calls.append(call)
        return call


def settled(stream: LeaseStream, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the lease thread did not settle"
        time.sleep(0.01)


def lease(opens: list[BaseException | None]) -> LeaseStream:
    return LeaseStream(FakeStub(opens), "m@v1", "test", None)


def test_a_relet_the_daemon_refuses_ends_the_lease_with_the_daemons_typed_error():
    refused = FakeRpcError(
        grpc.StatusCode.NOT_FOUND, "no model named 'm' is loaded", ((CLASS_KEY, "NotFound"), (DETAILS_KEY, "{}"))
    )
    stream = lease([refused])
    try:
        settled(stream, lambda: stream.lost_error is not None)
        err = stream.lost_error
        assert isinstance(err, errors.NotFound)
        assert str(err) == "the daemon no longer leases m@v1 (no model named 'm' is loaded)"
        assert err.details["ref"] == "m@v1" and isinstance(err.__cause__, errors.NotFound)
        assert stream.lost == str(err)  # the message, as before
    finally:
        stream.release()


def test_a_relet_on_a_closed_channel_ends_the_lease_as_closed():
    stream = lease([CLOSED])
    try:
        settled(stream, lambda: stream.lost_error is not None)
        assert isinstance(stream.lost_error, errors.FailedPrecondition)
        assert stream.lost == "the client it was made through was closed"
    finally:
        stream.release()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_relet_the_transport_fails_is_tried_again(code):
    """A daemon that is away, or whose gRPC layer cancels the call while it stops, is not a version gone."""
    stream = lease([FakeRpcError(code, "away"), FakeRpcError(code, "away"), None])
    try:
        settled(stream, lambda: stream.relets == 1 or stream.lost_error is not None)
        assert stream.lost_error is None and stream.relets == 1
    finally:
        stream.release()


def test_a_relet_that_never_finds_a_daemon_ends_unavailable(monkeypatch):
    monkeypatch.setattr(LeaseStream, "RELEASE_RETRY_SECONDS", 0.3)
    stream = lease([FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connect failed")] * 100)
    try:
        settled(stream, lambda: stream.lost_error is not None)
        err = stream.lost_error
        assert type(err) is errors.Unavailable and "to lease m@v1 again" in str(err)
        assert isinstance(err.__cause__, errors.Unavailable) and err.__cause__.details["transport"]
    finally:
        stream.release()


# ---- Watch and operator calls on a cancelled call ------------------------------------------------


class CancelledWatchCall:
    def __init__(self, cancelled_by_caller: bool = False) -> None:
        self.cancelled = cancelled_by_caller

    def __iter__(self):
        return self

    def __next__(self):
        raise FakeRpcError(grpc.StatusCode.CANCELLED, "Channel closed!" if self.cancelled else "going away")

    def cancel(self) -> None:
        self.cancelled = True


def test_a_watch_made_without_a_client_names_the_socket_and_the_stream():
    with pytest.raises(errors.Unavailable) as info:
        list(Watch(CancelledWatchCall(), socket="/run/hw.sock"))
    assert str(info.value) == (
        "the hotweights daemon on /run/hw.sock cancelled the watch stream (going away); it may be shutting down"
    )
    assert info.value.details["cancelled"] and info.value.details["grpc_code"] == "CANCELLED"


def test_a_watch_the_caller_closed_the_channel_under_ends_quietly():
    assert list(Watch(CancelledWatchCall(cancelled_by_caller=True), closed=lambda: True)) == []


class CancelsUnload(pb_grpc.HotweightsServicer):
    async def UnloadModel(self, request, context):
        await context.abort(grpc.StatusCode.CANCELLED, "the server cancelled it")


def test_an_operator_call_the_daemon_cancels_is_unavailable_naming_the_operator_socket():
    """Not a socket nobody answers on (no probe says "not running"), and not an untyped error."""
    with serving(CancelsUnload(), operator_socket=True) as path, hotweights.connect(path) as c:
        with pytest.raises(errors.Unavailable) as info:
            c.unload("m")
    err = info.value
    assert str(err) == (
        f"the hotweights daemon on {path}.admin cancelled UnloadModel (the server cancelled it); "
        "it may be shutting down"
    )
    assert err.details["cancelled"] and err.details["socket"] == f"{path}.admin"


class HoldsStatus(pb_grpc.HotweightsServicer):
    """Status waits until the test lets it go; ``started`` says the call is in."""

    def __init__(self) -> None:
        import threading

        self.started, self.release = threading.Event(), threading.Event()

    async def Status(self, request, context):
        import asyncio

        self.started.set()
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        return pb.StatusResponse()


def test_a_call_cut_short_by_closing_this_client_is_not_blamed_on_the_daemon():
    import threading

    from hotweights.testing import WAIT_TIMEOUT

    servicer = HoldsStatus()
    with serving(servicer) as path:
        c = hotweights.connect(path)
        closer = threading.Thread(target=lambda: (servicer.started.wait(WAIT_TIMEOUT), c.close()))
        closer.start()
        try:
            with pytest.raises(errors.HotweightsError) as info:
                c.status()
        finally:
            servicer.release.set()
            closer.join(WAIT_TIMEOUT)
    assert isinstance(info.value, errors.FailedPrecondition), info.value
    assert "this client was closed" in str(info.value) and "daemon" not in str(info.value)
