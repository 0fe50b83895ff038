"""The core without gRPC or sockets (real memfd backend, small fakes)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from hotweights import errors
from hotweights.format.checkpoint import open_checkpoint
from hotweights.format.safetensors import read_header
from hotweights.testing import CLI_TIMEOUT
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.backend import AllocationMode, DeviceMemory
from hotweightsd.core.events import EventKind
from hotweightsd.core.layout import ALIGN, SMALL_ALIGN, plan_rank
from hotweightsd.core.leases import TicketBook
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import State, split_ref
from support.ckpt_tools import mixed_tensors, raw_file, write_model


def test_core_imports_no_grpc():
    import subprocess

    code = (
        "import sys, hotweightsd.core.manager, hotweightsd.core.swap, hotweightsd.backends.cpu; "
        "print(sorted(m for m in sys.modules if m.startswith(('grpc', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=CLI_TIMEOUT
    ).stdout
    assert out.strip() == "[]"


def test_layout_packs_at_256_bytes_in_source_order(tmp_path):
    ckpt = open_checkpoint(write_model(tmp_path / "m.safetensors"))
    lay = plan_rank(ckpt.ranks[0], granularity=4096)
    assert all(p.offset % (ALIGN if p.nbytes >= ALIGN else SMALL_ALIGN) == 0 for p in lay.placements)
    ordered = sorted(lay.placements, key=lambda p: p.offset)
    for a, b in zip(ordered, ordered[1:]):
        assert a.offset + a.nbytes <= b.offset
    assert [p.file_offset for p in ordered] == sorted(p.file_offset for p in ordered)
    assert lay.allocation_sizes[0] % 4096 == 0 and lay.allocation_sizes[0] >= ordered[-1].offset + ordered[-1].nbytes


def test_layout_splits_allocations_at_the_cap(tmp_path):
    tensors = {f"t{i}": torch.zeros(1000, dtype=torch.float32) for i in range(10)}
    ckpt = open_checkpoint(write_model(tmp_path / "m.safetensors", tensors))
    lay = plan_rank(ckpt.ranks[0], granularity=4096, max_allocation=8192)
    assert len(lay.allocation_sizes) == 5
    for p in lay.placements:
        assert p.offset + p.nbytes <= lay.allocation_sizes[p.allocation]


def test_header_reader_accepts_what_safetensors_writes(tmp_path):
    h = read_header(write_model(tmp_path / "m.safetensors"))
    names = {t.name: t for t in h.tensors}
    assert names["bf16"].dtype.name == "BF16" and names["bf16"].shape == (3, 5, 7)
    assert names["scalar"].shape == () and names["scalar"].nbytes == 8
    assert names["empty"].nbytes == 0


def test_header_rejects_negative_shape(tmp_path):
    p = raw_file(tmp_path / "n.safetensors", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(errors.BadCheckpoint, match="not a list of non-negative integers"):
        read_header(p)


def test_sharded_layout_finds_ranks_and_rejects_gaps(tmp_path):
    for r in (0, 1):
        write_model(tmp_path / "s" / f"model-rank-{r}-part-0.safetensors", {"w": torch.full((4,), float(r))})
    assert open_checkpoint(tmp_path / "s").world_size == 2
    write_model(tmp_path / "s" / "model-rank-3-part-0.safetensors", {"w": torch.zeros(4)})
    with pytest.raises(errors.BadCheckpoint, match=r"lacks rank\(s\) \[2\]"):
        open_checkpoint(tmp_path / "s")


def test_tickets_are_single_use_and_expire():
    now = [0.0]
    book = TicketBook(ttl=5, clock=lambda: now[0])
    t = book.issue("lease", 0)
    assert book.redeem(t.token).lease_id == "lease"
    with pytest.raises(errors.TicketInvalid):
        book.redeem(t.token)
    t2 = book.issue("lease", 0)
    now[0] = 6
    with pytest.raises(errors.TicketInvalid):
        book.redeem(t2.token)


def test_tickets_are_capped_per_lease_and_in_all():
    now = [0.0]
    book = TicketBook(ttl=5, clock=lambda: now[0], limit=4, per_lease=2)
    first = book.issue("a", 0)
    second = book.issue("a", 0)
    book.issue("a", 0)  # a's third: its oldest goes
    with pytest.raises(errors.TicketInvalid):
        book.redeem(first.token)
    book.issue("b", 0)
    book.issue("b", 0)
    # in all: the oldest ticket of the process holding the most goes, never the newcomer's
    c = book.issue("c", 0, pid=7)
    with pytest.raises(errors.TicketInvalid):
        book.redeem(second.token)
    assert len(book) == 4
    assert book.redeem(c.token).lease_id == "c"
    now[0] = 6  # all expired: swept by the next issue
    book.issue("c", 0)
    assert len(book) == 1


def test_expired_tickets_are_swept_from_the_front_without_a_scan():
    now = [0.0]
    book = TicketBook(ttl=5, clock=lambda: now[0], per_lease=1000)
    for i in range(1000):
        now[0] = i * 0.01
        book.issue(f"lease-{i % 7}", 0)
    now[0] = 9.995  # the first half has expired
    live = book.issue("x", 0)
    assert len(book) == 501
    book.drop_lease("x")
    with pytest.raises(errors.TicketInvalid):
        book.redeem(live.token)
    assert len(book) == 500


def test_handles_and_fds_go_to_the_lease_holder_only(manager, tmp_path):
    manager.load("m", str(write_model(tmp_path / "m.safetensors")), version="v1")
    me, uid = os.getpid(), os.getuid()
    lease = manager.open_lease("m", pid=me)
    with pytest.raises(errors.PermissionDenied):
        manager.get_handles(lease.id, 0, "")  # the public id alone buys nothing
    h = manager.get_handles(lease.id, 0, lease.key)
    with pytest.raises(errors.PermissionDenied) as refused:
        manager.redeem(h.ticket, 1, uid)  # another process
    assert not isinstance(refused.value, errors.TicketInvalid)
    assert (lease.pid, lease.uid) == (me, -1)  # nothing rewritten
    _, fds = manager.redeem(h.ticket, me, uid)  # the ticket was not spent by the refusal
    for fd in fds:
        os.close(fd)
    assert lease.uid == uid  # the kernel's word, recorded at the holder's first fetch
    h2 = manager.get_handles(lease.id, 0, lease.key)
    with pytest.raises(errors.PermissionDenied):
        manager.redeem(h2.ticket, me, uid + 1)
    nameless = manager.open_lease("m")  # opened without a pid: its fds go to no one
    with pytest.raises(errors.PermissionDenied, match="without its holder's pid"):
        manager.redeem(manager.get_handles(nameless.id, 0, nameless.key).ticket, me, uid)


def test_a_holder_in_another_pid_namespace_is_matched_or_left_to_its_ticket(monkeypatch):
    from hotweightsd.core import leases

    ticket = leases.Ticket("t", "lease", 0, expires=0.0, pid=7, uid=1000)
    # a container's process: pid 7 inside, 4242 outside
    monkeypatch.setattr(leases, "_nspids", lambda pid: ["4242", "7"])
    leases.check_holder(ticket, 4242, 1000)
    # another container's process that is pid 8 inside
    monkeypatch.setattr(leases, "_nspids", lambda pid: ["4243", "8"])
    with pytest.raises(errors.PermissionDenied):
        leases.check_holder(ticket, 4243, 1000)
    # /proc hides the peer (ProtectProc=invisible): its pid cannot be matched, the uid still is
    monkeypatch.setattr(leases, "_nspids", lambda pid: None)
    leases.check_holder(ticket, 4242, 1000)
    with pytest.raises(errors.PermissionDenied):
        leases.check_holder(ticket, 4242, 1001)


def test_split_ref():
    assert split_ref("llama@v2") == ("llama", "v2")
    assert split_ref("llama") == ("llama", None)
    with pytest.raises(errors.InvalidArgument):
        split_ref("bad name@v1")


@pytest.fixture
def manager():
    m = ModelManager(CpuBackend(memory_limit=256 * 2**20))
    yield m
    m.close()


def test_manager_load_lease_handles_and_free(manager, tmp_path):
    events = []
    manager.events.subscribe(events.append)
    mv = manager.load("m", str(write_model(tmp_path / "m.safetensors")), version="v1")
    assert mv.state is State.READY and mv.resident_bytes > 0
    assert [e.kind for e in events] == [EventKind.VERSION_ADDED, EventKind.VERSION_READY]
    lease = manager.open_lease("m", pid=os.getpid())
    h = manager.get_handles(lease.id, 0, lease.key)
    _, fds = manager.redeem(h.ticket, os.getpid(), os.getuid())
    assert len(fds) == 1
    import mmap

    with mmap.mmap(fds[0], h.rank.allocations[0].size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        p = next(p for p in h.rank.layout.placements if p.name == "f32")
        got = torch.frombuffer(bytearray(mm[p.offset : p.offset + p.nbytes]), dtype=torch.float32).view(17, 33)
    os.close(fds[0])
    assert torch.equal(got, mixed_tensors()["f32"])
    with pytest.raises(errors.LeaseHeld):
        manager.unload("m")
    manager.close_lease(lease.id)
    freed, nbytes = manager.unload("m")
    assert freed == ["m@v1"] and nbytes > 0 and manager.resident_bytes() == 0
    assert manager.backend._resident == 0


def test_memfd_is_sealed_against_writes(manager, tmp_path):
    mv = manager.load("m", str(write_model(tmp_path / "m.safetensors")))
    fd = mv.ranks[0].allocations[0].fd
    import os

    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)


def test_admission_refuses_before_any_read(tmp_path):
    class NoReads(CpuBackend):
        def fill(self, *a, **k):
            raise AssertionError("read although the load cannot fit")

    m = ModelManager(NoReads(memory_limit=2**20))
    with pytest.raises(errors.InsufficientMemory) as exc:
        m.load("m", str(write_model(tmp_path / "m.safetensors")))
    assert exc.value.details["needed"] > exc.value.details["free"]
    assert m.versions() == [] and m.backend._resident == 0


def test_a_models_ranks_are_announced_to_the_backend_as_one_batch(tmp_path):
    seen = []

    class Recording(CpuBackend):
        def concurrent_fills(self, devices):
            seen.append(("announce", len(devices)))
            return super().concurrent_fills(devices)

        def fill(self, layout, *a, **k):
            seen.append(("fill", layout.rank))
            return super().fill(layout, *a, **k)

    for r in (0, 1):
        write_model(tmp_path / "s" / f"model-rank-{r}-part-0.safetensors", {"w": torch.full((4,), float(r))})
    ModelManager(Recording()).load("m", str(tmp_path / "s"))
    assert seen[0] == ("announce", 2) and sorted(seen[1:]) == [("fill", 0), ("fill", 1)]


def test_failed_fill_frees_everything_and_marks_failed(manager, tmp_path):
    path = write_model(tmp_path / "m.safetensors")
    mv, run = manager.begin_load("m", str(path), version="v1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # shrinks after the header was checked
    with pytest.raises(errors.BadCheckpoint, match="truncated"):
        run()
    assert mv.state is State.FAILED and "truncated" in mv.error
    assert manager.resident_bytes() == 0 and manager.backend._resident == 0
    with pytest.raises(errors.FailedPrecondition, match="FAILED"):
        manager.open_lease("m@v1")


def test_device_map_and_world_size_checked():
    class TwoGpus:
        name = "fake"
        shared_device = False

        def devices(self):
            return [DeviceMemory(0, "g0", 10, 10), DeviceMemory(1, "g1", 10, 10)]

    m = ModelManager(TwoGpus())  # type: ignore[arg-type]
    assert m._place(2, []) == [0, 1]
    assert m._place(2, [1, 0]) == [1, 0]
    with pytest.raises(errors.InvalidArgument, match="names device"):
        m._place(2, [0, 5])
    with pytest.raises(errors.InsufficientMemory, match="3 ranks but the node has 2"):
        m._place(3, [])


def test_concurrent_leases_are_counted(manager, tmp_path):
    manager.load("m", str(write_model(tmp_path / "m.safetensors")), version="v1")
    leases = []
    lock = threading.Lock()

    def take():
        le = manager.open_lease("m@v1")
        with lock:
            leases.append(le)

    threads = [threading.Thread(target=take) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(manager.get("m", "v1").leases) == 32
    for le in leases:
        manager.close_lease(le.id)
    assert manager.get("m", "v1").leases == set()


def test_legacy_ipc_mode_needs_cuda(manager, tmp_path):
    with pytest.raises(errors.InvalidArgument, match="legacy CUDA IPC needs --backend cuda"):
        manager.load("m", str(write_model(tmp_path / "m.safetensors")), mode=AllocationMode.LEGACY_IPC)
    assert manager.versions() == []


def test_unload_while_loading_cancels_and_frees_only_after_the_readers_stop(manager, tmp_path):
    """Freeing under in-flight reads would let them write into released memory."""
    mv, run = manager.begin_load("m", str(write_model(tmp_path / "m.safetensors")), version="v1")
    assert manager.backend._resident > 0
    freed, _ = manager.unload("m@v1")
    assert freed == ["m@v1"] and manager.versions() == []
    assert mv.cancel.is_set() and mv.ranks, "memory stays until the loader has stopped"
    with pytest.raises(errors.HotweightsError):
        run()
    assert mv.ranks == [] and manager.backend._resident == 0


def test_cpu_backend_total_is_the_hosts_memory_or_the_limit():
    """The total must not move with the page cache: MemTotal, or the memory_limit where one is set."""
    with open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    (host,) = CpuBackend().devices()
    assert host.total == mem_total and host.free <= host.total
    (capped,) = CpuBackend(memory_limit=256 * 2**20).devices()
    assert capped.total == 256 * 2**20 and capped.free <= capped.total
