"""A free that blocks holds up nobody else: not the registry lock, not the servicer's event loop.

The backend's free blocks until the test opens a gate. Every other call must be answered while it
is still blocked: the gate opens only after they returned, so none of them can have waited for it.
Each call carries a deadline as a guard, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

import hotweights
from hotweights.testing import wait_until
from hotweights.wire.pb import pb_grpc
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.events import EventKind
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.swap import swap
from hotweightsd.persist import statefile
from hotweightsd.persist.fdstore import Persister
from hotweightsd.server.fdchannel import FdChannel
from hotweightsd.server.service import HotweightsService, grpc_options
from hotweightsd.server.sockets import fd_socket_path
from support.ckpt_tools import mixed_tensors, same_bits, write_model
from support.daemons import short_tmpdir

GUARD_S = 10.0  # far beyond any answer that does not wait; far below the gate's own safety limit


class GatedFrees(CpuBackend):
    """Frees of the allocations made while ``gated`` is set block until the test opens ``gate``."""

    def __init__(self) -> None:
        super().__init__(memory_limit=256 * 2**20)
        self.gated = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def allocate(self, device, size, mode):
        alloc = super().allocate(device, size, mode)
        if self.gated:
            free = alloc.close

            def blocking_free() -> None:
                self.entered.set()
                self.gate.wait(60)  # a safety limit only: the test opens the gate
                free()

            alloc.close = blocking_free  # type: ignore[method-assign]
        return alloc


def within(fn: Callable[[], Any], timeout: float = GUARD_S) -> Any:
    """``fn()`` in a thread; fails (instead of hanging) when it does not return within ``timeout``."""
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: out.put(_outcome(fn)), daemon=True).start()
    try:
        ok, value = out.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout}s: it waited for the free")
    if not ok:
        raise value
    return value


def _outcome(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except BaseException as exc:
        return False, exc


def _load_slow_and_other(m: ModelManager, backend: GatedFrees, tmp_path: Path) -> None:
    backend.gated = True
    m.load("slow", str(write_model(tmp_path / "slow.safetensors", seed=1)), version="v1")
    backend.gated = False
    m.load("other", str(write_model(tmp_path / "other.safetensors", seed=2)), version="v1")


# ---- the core alone --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unload", "last-lease-of-retired"])
def test_registry_is_free_while_a_free_blocks(tmp_path, how):
    backend = GatedFrees()
    m = ModelManager(backend)
    try:
        _load_slow_and_other(m, backend, tmp_path)
        if how == "unload":
            stuck = threading.Thread(target=m.unload, args=("slow@v1",), daemon=True)
        else:
            lease = m.open_lease("slow@v1")
            m.retire("slow@v1")  # freed when its last lease ends
            stuck = threading.Thread(target=m.close_lease, args=(lease.id,), daemon=True)
        stuck.start()
        assert backend.entered.wait(GUARD_S), "the free never started"

        assert [v.key for v in within(m.versions)] == ["other@v1"]
        lease = within(lambda: m.open_lease("other", pid=os.getpid()))
        handles = within(lambda: m.get_handles(lease.id, 0, lease.key))
        _, fds = within(lambda: m.redeem(handles.ticket, os.getpid(), os.getuid()))
        for fd in fds:
            os.close(fd)
        within(lambda: m.set_alias("prod", "other@v1", create=True))
        within(lambda: m.close_lease(lease.id))

        assert stuck.is_alive() and not backend.gate.is_set(), "answered while the free was still blocked"
        backend.gate.set()
        stuck.join(GUARD_S)
        assert not stuck.is_alive()
        assert backend._resident == sum(a.size for r in m.get("other", "v1").ranks for a in r.allocations)
    finally:
        backend.gate.set()
        m.close()


def test_events_reach_subscribers_in_the_order_of_the_changes(tmp_path):
    m = ModelManager(CpuBackend(memory_limit=256 * 2**20))
    try:
        for v in ("v1", "v2"):
            m.load("m", str(write_model(tmp_path / f"{v}.safetensors")), version=v)
        seen: list = []
        m.events.subscribe(seen.append)

        def flip(i: int) -> None:
            for j in range(50):
                m.set_alias("prod", f"m@v{1 + (i + j) % 2}", create=True)

        threads = [threading.Thread(target=flip, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        moved = [e for e in seen if e.kind is EventKind.ALIAS_MOVED]
        assert len(moved) == 300
        assert [e.seq for e in seen] == sorted(e.seq for e in seen)
        assert f"m@{moved[-1].version}" == m.aliases()["prod"]
    finally:
        m.close()


# ---- the persister ---------------------------------------------------------------------------


def test_the_persister_writes_once_for_the_events_it_found_queued(tmp_path):
    m = ModelManager(CpuBackend(memory_limit=256 * 2**20))
    state = tmp_path / "hw.sock.state.json"
    persister = Persister(m, state, str(tmp_path / "hw.sock"), fdstore=False)
    try:
        m.load("a", str(write_model(tmp_path / "a.safetensors", seed=1)), version="v1")
        m.load("b", str(write_model(tmp_path / "b.safetensors", seed=2)), version="v1")
        m.set_alias("prod", "a@v1", create=True)
        assert not state.exists()  # queued only: nothing is written on the publishing threads
        persister.start()
        assert persister.flush()
        assert persister.writes == 1
        doc = statefile.load(state)
        assert doc["socket"] == str(tmp_path / "hw.sock")
        assert sorted(v["name"] for v in doc["versions"]) == ["a", "b"] and doc["aliases"] == {"prod": "a@v1"}
    finally:
        persister.close()
        m.close()


def test_a_stuck_state_write_holds_up_no_registry_change(tmp_path, monkeypatch):
    m = ModelManager(CpuBackend(memory_limit=256 * 2**20))
    persister = Persister(m, tmp_path / "hw.sock.state.json", str(tmp_path / "hw.sock"), fdstore=False)
    entered, gate = threading.Event(), threading.Event()
    real_save = statefile.save

    def stuck_save(path, doc):
        entered.set()
        gate.wait(60)
        real_save(path, doc)

    monkeypatch.setattr(statefile, "save", stuck_save)
    try:
        persister.start()
        assert entered.wait(GUARD_S)
        path = str(write_model(tmp_path / "m.safetensors"))
        within(lambda: m.load("m", path, version="v1"))
        within(lambda: m.set_alias("prod", "m@v1", create=True))
        within(lambda: m.unload("m", force=True))
        assert not gate.is_set()
    finally:
        gate.set()
        persister.close()
        m.close()


# ---- through the real servicer, on its own event loop ------------------------------------------


@pytest.fixture
def served():
    """The real servicer and fd channel in this process, on a real unix socket, with GatedFrees."""
    d = Path(short_tmpdir())
    sock = str(d / "hw.sock")
    backend = GatedFrees()
    manager = ModelManager(backend)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(options=grpc_options())
        service = HotweightsService(manager, sock, fd_socket_path(sock))
        pb_grpc.add_HotweightsServicer_to_server(service, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        return server, service

    server, service = asyncio.run_coroutine_threadsafe(start(), loop).result(GUARD_S)
    channel = FdChannel(fd_socket_path(sock), manager)
    channel.start()
    yield SimpleNamespace(socket=sock, backend=backend, manager=manager, loop=loop)
    backend.gate.set()
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(GUARD_S)
    service.close()
    channel.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(GUARD_S)
    loop.close()
    manager.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("how", ["unload", "last-lease-of-retired"])
def test_list_status_and_attach_are_answered_while_a_free_blocks(served, tmp_path, how):
    """A free that blocks must not delay List, Status or Attach: here the free blocks until every other
    call has returned, which proves they did not wait for it on any machine, however loaded."""
    backend, m = served.backend, served.manager
    _load_slow_and_other(m, backend, tmp_path)
    client = hotweights.connect(served.socket, timeout=GUARD_S)
    other = hotweights.connect(served.socket, timeout=60, operator_socket=served.socket)  # one server takes all
    client.status()  # connected before anything blocks
    if how == "unload":
        stuck = threading.Thread(target=other.unload, args=("slow@v1",), daemon=True)
    else:
        held = other.attach("slow@v1", holder="retired")
        m.retire("slow@v1")  # freed by the end of its last lease, i.e. in the Lease stream's handler
        stuck = threading.Thread(target=held.release, daemon=True)
    stuck.start()
    assert backend.entered.wait(GUARD_S), "the free never started"

    listed = within(client.list)
    st = within(client.status)

    def attach_other() -> bool:
        with client.attach("other", holder="meanwhile") as w:
            ref = mixed_tensors(2)
            return all(same_bits(w[k], ref[k]) for k in ref)

    assert within(attach_other)
    assert not backend.gate.is_set(), "every call above was answered while the free was blocked"

    assert [v.name for v in listed.versions] == ["other"]
    assert [v.name for v in st.versions] == ["other"]
    backend.gate.set()
    stuck.join(GUARD_S)
    assert not stuck.is_alive()
    assert [v.key for v in m.versions()] == ["other@v1"] and m.leases() == []
    assert backend._resident == sum(a.size for r in m.get("other", "v1").ranks for a in r.allocations)
    client.close()
    other.close()


def test_a_lease_that_is_slow_to_open_holds_up_no_other_call_and_ends_with_its_stream(served, tmp_path):
    """Opening a lease (the registry lock, a first attach's table) runs off the servicer's event loop;
    a stream that goes away while its lease is being opened leaves no lease behind."""
    m = served.manager
    _load_slow_and_other(m, served.backend, tmp_path)
    gate, entered, opened = threading.Event(), threading.Event(), threading.Event()
    real_open = m.open_lease

    def slow_open(ref, pid=0, uid=-1, holder=""):
        if holder != "slow":
            return real_open(ref, pid=pid, uid=uid, holder=holder)
        entered.set()
        gate.wait(60)  # a safety limit only: the test opens the gate
        lease = real_open(ref, pid=pid, uid=uid, holder=holder)
        opened.set()
        return lease

    m.open_lease = slow_open  # type: ignore[method-assign]
    waiting = hotweights.connect(served.socket, timeout=60)
    outcome: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: outcome.put(_outcome(lambda: waiting.attach("other", holder="slow"))), daemon=True
    ).start()
    try:
        assert entered.wait(GUARD_S), "the slow lease never started to open"
        client = hotweights.connect(served.socket, timeout=GUARD_S)
        assert [v.name for v in within(client.status).versions] == ["other", "slow"]
        with within(lambda: client.attach("other", holder="meanwhile")) as w:
            ref = mixed_tensors(2)
            assert all(same_bits(w[k], ref[k]) for k in ref)
        assert not gate.is_set(), "both calls were answered while the lease was still opening"
        waiting.close()  # the stream goes away before its lease exists
        ok, _ = outcome.get(timeout=GUARD_S)
        assert not ok
    finally:
        gate.set()
    assert opened.wait(GUARD_S), "the slow lease was opened once the gate opened"
    wait_until(lambda: not m.leases(), GUARD_S, "the lease opened for the abandoned stream to end", interval=0.01)
    assert not m.get("other", "v1").leases
    client.close()


@pytest.mark.parametrize("how", ["load", "load-no-wait", "swap", "rollback"])
def test_the_answer_of_a_load_swap_or_rollback_is_built_off_the_event_loop(served, tmp_path, how):
    """The version info a LoadModel, SwapModel or Rollback ends with asks the manager for the version's
    aliases and sharing (the registry lock); here that waits until the test opens a gate, and the
    servicer's event loop must still run other work meanwhile."""
    m = served.manager
    first = str(write_model(tmp_path / "a.safetensors", seed=1))
    m.load("m", first, version="v1", alias="prod")
    m.load("m", str(write_model(tmp_path / "b.safetensors", seed=2)), version="v2")
    if how == "rollback":
        swap(m, "prod", "m@v2", keep_previous=True).run()
    target = "m@v2" if how == "swap" else "m@v1"
    gate, entered = threading.Event(), threading.Event()
    real_shares_with = m.shares_with

    def waiting_shares_with(mv):
        if mv.key == target and not gate.is_set():
            entered.set()
            gate.wait(60)  # a safety limit only: the test opens the gate
        return real_shares_with(mv)

    m.shares_with = waiting_shares_with  # type: ignore[method-assign]
    op = hotweights.connect(served.socket, timeout=60, operator_socket=served.socket)
    calls = {
        "load": lambda: op.load("m", first, version="v1").name,
        "load-no-wait": lambda: op.load("m", first, version="v1", wait=False).name,
        "swap": lambda: op.swap("prod", "m@v2").name,
        "rollback": lambda: op.rollback("prod").version.name,
    }
    outcome: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: outcome.put(_outcome(calls[how])), daemon=True).start()
    try:
        assert entered.wait(GUARD_S), "the answer was never built"
        within(lambda: asyncio.run_coroutine_threadsafe(asyncio.sleep(0), served.loop).result(GUARD_S))
        assert not gate.is_set(), "the loop ran while the answer was still being built"
    finally:
        gate.set()
    ok, value = outcome.get(timeout=GUARD_S)
    assert ok, value
    assert value == "m"
    op.close()
