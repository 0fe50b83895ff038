"""Watch.wait_subscribed() against stand-in servers: it returns once the daemon has subscribed the stream
(its initial metadata), raises the stream's typed error for one refused first, and times out typed."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

import hotweights
from hotweights import errors
from hotweights.wire.pb import pb, pb_grpc
from hotweights.wire.status import SUBSCRIBED_KEY
from support.stub_server import serving


class SubscribesWhenLet(pb_grpc.HotweightsServicer):
    """Subscribes each stream once the test opens ``gate``, sends one event, then holds it open."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.subscribed = threading.Event()

    async def Watch(self, request, context):
        while not self.gate.is_set():  # a condition wait that leaves the server's loop free
            await asyncio.sleep(0.01)
        self.subscribed.set()
        await context.send_initial_metadata(((SUBSCRIBED_KEY, "1"),))
        yield pb.WatchEvent(seq=1)
        await asyncio.Event().wait()  # open until the caller cancels it or the server stops


class Refuses(pb_grpc.HotweightsServicer):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    async def Watch(self, request, context):
        await context.abort(self.code, "not taken")
        yield pb.WatchEvent()  # never reached: makes this a stream


def test_it_returns_once_the_daemon_has_subscribed_the_stream():
    servicer = SubscribesWhenLet()
    with serving(servicer) as path, hotweights.connect(path) as c:
        watch = c.watch("")
        servicer.gate.set()
        assert watch.wait_subscribed(10) is watch
        assert servicer.subscribed.is_set()
        assert next(iter(watch)).seq == 1
        watch.cancel()


def test_a_stream_not_subscribed_in_time_raises_deadline_exceeded_and_stays_usable():
    servicer = SubscribesWhenLet()
    with serving(servicer) as path, hotweights.connect(path) as c:
        watch = c.watch("")
        with pytest.raises(errors.DeadlineExceeded, match=rf"on {path} did not subscribe the watch stream"):
            watch.wait_subscribed(0.2)
        assert not servicer.subscribed.is_set()  # it gave up at its bound, before any subscription
        servicer.gate.set()
        watch.wait_subscribed(10)  # still open: it is subscribed later
        watch.cancel()
        assert list(watch) == []


def test_a_stream_the_daemon_refuses_raises_its_typed_error():
    with serving(Refuses(grpc.StatusCode.RESOURCE_EXHAUSTED)) as path, hotweights.connect(path) as c:
        with pytest.raises(errors.ResourceExhausted, match="not taken"):
            c.watch("").wait_subscribed(10)


def test_a_stream_the_daemon_cancels_raises_unavailable():
    with serving(Refuses(grpc.StatusCode.CANCELLED)) as path, hotweights.connect(path) as c:
        with pytest.raises(errors.Unavailable, match=r"cancelled the watch stream \(not taken\)"):
            c.watch("").wait_subscribed(10)


def test_a_stream_the_caller_cancelled_returns_at_once():
    servicer = SubscribesWhenLet()  # never let: only the cancel can end the wait
    with serving(servicer) as path, hotweights.connect(path) as c:
        watch = c.watch("")
        watch.cancel()
        assert watch.wait_subscribed(10) is watch  # waiting out the bound would raise DeadlineExceeded
        assert not servicer.subscribed.is_set()
        assert list(watch) == []
