"""Client.watch() against a stand-in server that cancels the stream (as the daemon's gRPC layer does to
a call it does not take): the watcher gets Unavailable, not an iteration that ends as if it were done."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import grpc
import pytest

import hotweights
from hotweights import errors
from hotweights.wire.pb import pb, pb_grpc


class Cancelling(pb_grpc.HotweightsServicer):
    async def Watch(self, request, context):
        await context.send_initial_metadata(())
        yield pb.WatchEvent(seq=1)
        await context.abort(grpc.StatusCode.CANCELLED, "the server cancelled it")


@pytest.fixture
def socket() -> Iterator[str]:
    where = tempfile.mkdtemp(prefix="hw-", dir="/tmp")
    path = os.path.join(where, "s.sock")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Future | None = None

    async def serve() -> None:
        nonlocal stop
        server = grpc.aio.server()
        pb_grpc.add_HotweightsServicer_to_server(Cancelling(), server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        stop = loop.create_future()
        started.set()
        await stop
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield path
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()
        shutil.rmtree(where, ignore_errors=True)


def test_a_stream_the_server_cancels_raises_unavailable(socket):
    seen = []
    with hotweights.connect(socket) as c:
        with pytest.raises(errors.Unavailable, match=r"cancelled the watch stream \(the server cancelled it\)") as info:
            for ev in c.watch(""):
                seen.append(ev.seq)
    assert seen == [1]
    assert socket in str(info.value) and info.value.details["grpc_code"] == "CANCELLED"


def test_a_watch_the_server_ended_says_so_again_when_iterated_again(socket):
    with hotweights.connect(socket) as c:
        w = c.watch("")
        with pytest.raises(errors.Unavailable):
            list(w)
        with pytest.raises(errors.Unavailable, match="cancelled the watch stream"):
            list(w)
