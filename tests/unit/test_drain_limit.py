"""Drain swaps wait in threads of their own, a bounded number: one more is refused at once, saying why,
and a thread a drain gave back is there for the next."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hotweights import errors
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.server.service import DRAIN_THREADS, HotweightsService


def test_a_drain_past_the_drain_threads_is_refused_and_a_finished_one_frees_its_place(tmp_path):
    m = ModelManager(CpuBackend(memory_limit=2**20))
    svc = HotweightsService(m, str(tmp_path / "hw.sock"), str(tmp_path / "hw.sock.fd"))
    gate = threading.Event()

    async def go() -> None:
        waiting = [svc._drain_thread(gate.wait, 60) for _ in range(DRAIN_THREADS)]
        with pytest.raises(errors.ResourceExhausted, match="drain swaps are already waiting"):
            svc._drain_thread(lambda: None)
        gate.set()
        assert await asyncio.gather(*waiting) == [True] * DRAIN_THREADS
        assert await svc._drain_thread(lambda: "ran") == "ran"

    try:
        asyncio.run(go())
    finally:
        gate.set()
        svc.close()
        m.close()
