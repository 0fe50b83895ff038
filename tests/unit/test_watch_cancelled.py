"""Client.watch() against a stand-in server that cancels the stream (as the daemon's gRPC layer does to
a call it does not take): the watcher gets Unavailable, not an iteration that ends as if it were done."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

import hotweights
from hotweights import errors
from hotweights.wire.pb import pb, pb_grpc
from support.stub_server import serving


class Cancelling(pb_grpc.HotweightsServicer):
    async def Watch(self, request, context):
        await context.send_initial_metadata(())
        yield pb.WatchEvent(seq=1)
        await context.abort(grpc.StatusCode.CANCELLED, "the server cancelled it")


@pytest.fixture
def socket() -> Iterator[str]:
    with serving(Cancelling()) as path:
        yield path


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
