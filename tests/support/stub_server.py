"""A stand-in gRPC server for client tests: a servicer of the test's own on a real unix socket, served
from an event loop in a thread of the test process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import grpc

from hotweights.testing import WAIT_TIMEOUT
from hotweights.wire.pb import pb_grpc


@contextlib.contextmanager
def serving(servicer: pb_grpc.HotweightsServicer, *, operator_socket: bool = False) -> Iterator[str]:
    """Serves ``servicer`` on a fresh socket (and the operator socket beside it where asked); yields its path."""
    where = tempfile.mkdtemp(prefix="hw-", dir="/tmp")
    path = os.path.join(where, "s.sock")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Future | None = None

    async def serve() -> None:
        nonlocal stop
        server = grpc.aio.server()
        pb_grpc.add_HotweightsServicer_to_server(servicer, server)
        for p in (path, path + ".admin") if operator_socket else (path,):
            server.add_insecure_port(f"unix:{p}")
        await server.start()
        stop = loop.create_future()
        started.set()
        await stop
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(WAIT_TIMEOUT)
    try:
        yield path
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(WAIT_TIMEOUT)
        loop.close()
        shutil.rmtree(where, ignore_errors=True)
