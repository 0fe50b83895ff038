"""The client end of a Lease stream, against a fake stub: an open interrupted midway ends the request stream."""

from __future__ import annotations

import threading

import pytest

from hotweights.attach import LeaseStream
from hotweights.testing import WAIT_TIMEOUT


class _Interrupted:
    """A Lease call whose first answer never comes: the caller is interrupted while waiting for it."""

    def __init__(self, requests):
        self.requests = requests
        self.cancelled = False

    def __next__(self):
        raise KeyboardInterrupt

    def cancel(self):
        self.cancelled = True


class _Stub:
    def Lease(self, requests):
        self.call = _Interrupted(requests)
        return self.call


def test_an_interrupted_open_ends_the_request_stream():
    stub = _Stub()
    with pytest.raises(KeyboardInterrupt):
        LeaseStream(stub, "m", "holder", None, rank=0)
    sent: list = []
    # gRPC drains the requests in a thread of its own; the stream ends once they end
    drain = threading.Thread(target=lambda: sent.extend(stub.call.requests), daemon=True)
    drain.start()
    drain.join(WAIT_TIMEOUT)
    assert not drain.is_alive(), "the request stream still waits for a release nobody will send"
    assert [r.WhichOneof("msg") for r in sent] == ["open", "release"]
    assert stub.call.cancelled
