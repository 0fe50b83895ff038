"""The same files loaded under two names are resident once: the second version is given the first's
allocations (nothing read or allocated), each allocation is freed once its last holder goes, status
counts it once, and a restart from the fd store keeps it shared."""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hotweights import errors
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.backend import DeviceMemory
from hotweightsd.core.events import EventKind
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, State
from hotweightsd.persist import statefile
from hotweightsd.persist.fdstore import Persister
from hotweightsd.persist.restore import restore
from hotweightsd.server.metrics import snapshot
from support.ckpt_tools import versioned_model
from support.served import served_bytes
from support.svcmgr import hand_over_fds
from support.threads import started

MiB = 2**20


class CountingBackend(CpuBackend):
    """Counts allocations, fills and every close of each allocation (a double free shows as 2)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.allocations = 0
        self.fills = 0
        self.closes: Counter[int] = Counter()

    def allocate(self, *a, **k):
        self.allocations += 1
        return self._counted(super().allocate(*a, **k))

    def adopt(self, *a, **k):
        return self._counted(super().adopt(*a, **k))

    def _counted(self, alloc):
        close = alloc.close

        def counted_close() -> None:
            self.closes[id(alloc)] += 1
            close()

        alloc.close = counted_close
        return alloc

    def fill(self, *a, **k):
        self.fills += 1
        return super().fill(*a, **k)


class TwoHosts(CountingBackend):
    """Two devices (both host memory underneath), to tell placements apart."""

    shared_device = False

    def devices(self):
        d = super().devices()[0]
        return [DeviceMemory(0, "h0", d.total, d.free), DeviceMemory(1, "h1", d.total, d.free)]


@pytest.fixture
def manager():
    m = ModelManager(CountingBackend(memory_limit=64 * MiB))
    yield m
    m.close()


def _allocs(mv: ModelVersion) -> list:
    return [a for r in mv.ranks for a in r.allocations]


def _same_objects(a: ModelVersion, b: ModelVersion) -> bool:
    return len(_allocs(a)) == len(_allocs(b)) > 0 and all(x is y for x, y in zip(_allocs(a), _allocs(b)))


def _read_all(m: ModelManager, ref: str) -> dict[str, bytearray]:
    """Every tensor of ``ref`` as a client sees it: through a lease, a ticket and the fds it redeems."""
    return {name: raw for name, (_, raw) in served_bytes(m, ref).items()}


def _equal_to_file(got: dict[str, bytearray], path: Path) -> bool:
    want = load_file(str(path))
    return sorted(got) == sorted(want) and all(
        bytes(got[k]) == want[k].contiguous().view(torch.uint8).numpy().tobytes() for k in want
    )


def test_second_name_for_the_same_files_shares_the_memory_and_reads_nothing(manager, tmp_path):
    path = versioned_model(tmp_path, 1)
    a = manager.load("a", str(path.parent), version="v1")
    resident, allocs, fills = manager.resident_bytes(), manager.backend.allocations, manager.backend.fills
    events = []
    manager.events.subscribe(events.append)

    start = manager.start_load("b", str(path.parent), alias="prod", version="v1")
    assert not start.already_loaded and start.version.state is State.READY
    b = start.run()
    assert b is start.version and b.state is State.READY and b.shares == "a@v1"
    assert _same_objects(a, b) and [r.layout for r in b.ranks] == [r.layout for r in a.ranks]
    assert b.ranks[0] is not a.ranks[0] and b.ranks[0].allocations is not a.ranks[0].allocations
    assert (manager.backend.allocations, manager.backend.fills) == (allocs, fills)  # nothing allocated or read
    assert manager.resident_bytes() == resident == a.resident_bytes == b.resident_bytes  # counted once
    assert b.bytes_total == a.bytes_total and b.load_seconds == 0.0
    assert b.load_path == "shares the memory of a@v1 (same files): nothing read"
    assert [(e.kind, e.name) for e in events if e.kind is not EventKind.ALIAS_MOVED] == [
        (EventKind.VERSION_ADDED, "b"),
        (EventKind.VERSION_READY, "b"),
    ]
    assert manager.aliases() == {"prod": "b@v1"}
    assert len(manager.unique_allocations()) == len(_allocs(a))
    assert manager.resident_by_device() == {0: resident}
    snap = {(v["name"], v["version"]): v["resident_by_device"] for v in snapshot(manager)["versions"]}
    assert snap == {("a", "v1"): {0: resident}, ("b", "v1"): {0: 0}}  # the gauge sums to one copy


def test_unloading_either_keeps_the_other_and_the_last_frees_once(manager, tmp_path):
    path = versioned_model(tmp_path, 1)
    a = manager.load("a", str(path), version="v1")
    b = manager.load("b", str(path), version="v1")
    ids = [id(x) for x in _allocs(a)]
    one_copy = manager.backend._resident
    assert b.shares == "a@v1" and one_copy == a.resident_bytes

    assert manager.shares_with(b) == "a@v1" and manager.shares_with(a) == ""
    freed, nbytes = manager.unload("a")
    assert freed == ["a@v1"] and nbytes == 0  # the memory stays: b holds it
    assert manager.shares_with(b) == "" and b.shares == "a@v1"  # b holds it alone now
    assert a.freed and b.state is State.READY and not b.freed
    assert manager.backend._resident == one_copy and manager.resident_bytes() == one_copy
    assert not manager.backend.closes
    assert _equal_to_file(_read_all(manager, "b@v1"), path)

    freed, nbytes = manager.unload("b")
    assert freed == ["b@v1"] and nbytes == one_copy
    assert manager.backend._resident == 0 and manager.resident_bytes() == 0
    assert manager.backend.closes == Counter({i: 1 for i in ids}) and ids


def test_unloading_the_sharer_first_keeps_the_source(manager, tmp_path):
    path = versioned_model(tmp_path, 1)
    a = manager.load("a", str(path), version="v1")
    manager.load("b", str(path), version="v1")
    manager.unload("b")
    assert manager.backend._resident == a.resident_bytes and not manager.backend.closes
    assert _equal_to_file(_read_all(manager, "a@v1"), path)
    manager.unload("a")
    assert manager.backend._resident == 0 and list(manager.backend.closes.values()) == [1]


def test_close_with_both_loaded_closes_each_allocation_once(tmp_path):
    m = ModelManager(CountingBackend(memory_limit=64 * MiB))
    path = versioned_model(tmp_path, 1)
    a = m.load("a", str(path), version="v1")
    m.load("b", str(path), version="v1")
    m.load("c", str(path), version="v1")
    ids = [id(x) for x in _allocs(a)]
    m.close()
    assert m.backend.closes == Counter({i: 1 for i in ids}) and ids
    assert m.backend._resident == 0


def test_a_symlink_or_a_hard_link_to_the_same_files_is_shared(manager, tmp_path):
    path = versioned_model(tmp_path, 1)
    a = manager.load("a", str(path.parent), version="v1")
    (tmp_path / "link").symlink_to(path.parent, target_is_directory=True)
    linked = tmp_path / "hard" / path.name
    linked.parent.mkdir()
    os.link(path, linked)
    b = manager.load("b", str(tmp_path / "link"), version="v1")
    c = manager.load("c", str(linked), version="v1")
    assert b.shares == c.shares == "a@v1" and _same_objects(a, b) and _same_objects(a, c)
    assert manager.backend.fills == 1 and manager.resident_bytes() == a.resident_bytes


def test_a_copy_a_rewritten_file_or_other_files_are_not_shared(manager, tmp_path):
    path = versioned_model(tmp_path, 1)
    a = manager.load("a", str(path), version="v1")

    copy = tmp_path / "copy" / path.name
    copy.parent.mkdir()
    shutil.copy2(path, copy)  # same bytes and mtime, another inode: telling it apart would mean hashing
    b = manager.load("b", str(copy), version="v1")

    other = manager.load("c", str(versioned_model(tmp_path, 2)), version="v1")

    manager.unload("b")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten in place: new mtime
    d = manager.load("d", str(path), version="v1")

    for mv in (b, other, d):
        assert not mv.shares and not set(map(id, _allocs(mv))) & set(map(id, _allocs(a))), mv.key
    assert manager.backend.fills == 4
    assert manager.resident_bytes() == a.resident_bytes + other.resident_bytes + d.resident_bytes


def test_the_same_files_on_other_devices_are_not_shared(tmp_path):
    m = ModelManager(TwoHosts(memory_limit=64 * MiB))
    try:
        path = str(versioned_model(tmp_path, 1))
        a = m.load("a", path, version="v1", device_map=[0])
        elsewhere = m.load("b", path, version="v1", device_map=[1])
        same = m.load("c", path, version="v1", device_map=[0])
        anywhere = m.load("d", path, version="v1")  # no device map: the source's placement is accepted
        assert not elsewhere.shares and elsewhere.ranks[0].device == 1
        assert same.shares == anywhere.shares == "a@v1" and _same_objects(a, same) and _same_objects(a, anywhere)
        assert m.backend.fills == 2
        assert m.resident_by_device() == {0: a.resident_bytes, 1: elsewhere.resident_bytes}
    finally:
        m.close()


def test_a_shared_load_is_still_verified_at_its_level(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))  # no hotweights.json beside it
    manager.load("a", path, version="v1", verify="none")
    with pytest.raises(errors.FailedPrecondition, match=r"verify=full \(from this load.s verify\) needs a hotweights"):
        manager.load("b", path, version="v1", verify="full")
    assert [v.key for v in manager.versions()] == ["a@v1"]


def test_a_load_of_files_another_is_reading_waits_for_that_read_and_shares_it(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    first = manager.start_load("a", path, version="v1")  # registered and allocated, not read yet
    allocs = manager.backend.allocations
    second = manager.start_load("b", path, version="v1", alias="prod")
    b = second.version
    assert b.state is State.LOADING and b.shares == "a@v1" and not b.ranks
    assert manager.backend.allocations == allocs  # nothing allocated for b
    done = started(second.run)
    a = first.run()
    assert done(60) is b
    assert b.state is State.READY and _same_objects(a, b) and b.bytes_done == b.bytes_total == a.bytes_total
    assert manager.backend.fills == 1 and manager.backend.allocations == allocs  # read once
    assert b.load_path == "shares the memory of a@v1 (same files): nothing read"
    assert manager.aliases() == {"prod": "b@v1"} and manager.shares_with(b) == "a@v1"
    assert manager.resident_bytes() == a.resident_bytes
    assert _equal_to_file(_read_all(manager, "b@v1"), Path(path))


def test_when_the_read_it_waits_for_goes_away_it_reads_the_files_itself(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    first = manager.start_load("a", path, version="v1")
    second = manager.start_load("b", path, version="v1")
    done = started(second.run)
    manager.unload("a@v1")  # before a reads anything
    with pytest.raises(errors.HotweightsError):
        first.run()
    b = done(60)
    assert b.state is State.READY and not b.shares and manager.shares_with(b) == ""
    assert [v.key for v in manager.versions()] == ["b@v1"]
    assert manager.resident_bytes() == b.resident_bytes > 0
    assert _equal_to_file(_read_all(manager, "b@v1"), Path(path))
    manager.unload("b@v1")
    assert manager.backend._resident == 0


def test_unloading_a_version_that_waits_on_another_read_ends_its_wait(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    first = manager.start_load("a", path, version="v1")
    second = manager.start_load("b", path, version="v1")
    events = []
    manager.events.subscribe(events.append)
    done = started(second.run)
    with pytest.raises(AssertionError, match="still running"):
        done(0.2)  # waiting: a has not read yet
    assert manager.unload("b@v1") == (["b@v1"], 0)
    with pytest.raises(errors.Unavailable, match="b@v1 was unloaded while loading"):
        done(60)
    # it ends as any load cancelled by an unload: freed, then failed
    assert [(e.kind, e.name) for e in events] == [(EventKind.VERSION_FREED, "b"), (EventKind.VERSION_FAILED, "b")]
    a = first.run()
    assert a.state is State.READY and manager.backend.fills == 1
    assert [v.key for v in manager.versions()] == ["a@v1"]


def test_of_two_loads_waiting_on_a_read_that_goes_away_one_reads_and_the_other_shares_it(tmp_path):
    """Room for one copy and a half: the waiters decide only once the cancelled read has freed its
    memory, and then one reads while the other waits on it, so both end READY on one copy."""
    path = str(versioned_model(tmp_path, 1))
    probe = ModelManager(CountingBackend(memory_limit=64 * MiB))
    try:
        one = sum(a.size for r in probe.start_load("x", path).version.ranks for a in r.allocations)
    finally:
        probe.close()
    m = ModelManager(CountingBackend(memory_limit=one + one // 2))
    try:
        first = m.start_load("a", path, version="v1")
        waits = [started(m.start_load(n, path, version="v1").run) for n in ("b", "c")]
        m.unload("a@v1")
        with pytest.raises(errors.HotweightsError):
            first.run()
        b, c = (w(60) for w in waits)
        assert b.state is State.READY and c.state is State.READY
        assert sorted([b.shares, c.shares]) in (["", "b@v1"], ["", "c@v1"])
        assert _same_objects(b, c) and m.resident_bytes() == one
        assert _equal_to_file(_read_all(m, "c@v1"), Path(path))
    finally:
        m.close()


def test_a_load_that_another_name_overtakes_between_its_look_and_its_registration_waits_on_it(
    manager, tmp_path, monkeypatch
):
    """Two loads at the same moment: b registers as the reader after a found nothing to share but
    before a registered, so a looks again and waits on b instead of reading the files a second time."""
    path = str(versioned_model(tmp_path, 1))
    plan = manager._plan
    other: list = []

    def b_registers_meanwhile(*args):
        if not other:
            other.append(None)
            other[0] = manager.start_load("b", path, version="v1")
        return plan(*args)

    monkeypatch.setattr(manager, "_plan", b_registers_meanwhile)
    first = manager.start_load("a", path, version="v1")
    assert first.version.state is State.LOADING and first.version.shares == "b@v1" and not first.version.ranks
    done = started(first.run)
    b = other[0].run()
    a = done(60)
    assert a.state is State.READY and _same_objects(a, b) and manager.backend.fills == 1
    assert manager.resident_bytes() == b.resident_bytes


def test_a_load_with_a_device_map_waits_on_a_reader_that_is_still_allocating(manager, tmp_path, monkeypatch):
    """The reader's ranks exist only once allocated; its planned devices are known from registration,
    so a load asking for the same devices in that window waits on it instead of reading again."""
    path = str(versioned_model(tmp_path, 1))
    allocate = manager._admit_and_allocate
    inside, go = threading.Event(), threading.Event()

    def slow_for_b(mv, *args):
        if mv.name == "b":
            inside.set()
            assert go.wait(60)
        return allocate(mv, *args)

    monkeypatch.setattr(manager, "_admit_and_allocate", slow_for_b)
    b_started = started(lambda: manager.start_load("b", path, version="v1", device_map=[0]))
    assert inside.wait(60)
    a = manager.start_load("a", path, version="v1", device_map=[0])
    assert a.version.shares == "b@v1" and a.version.state is State.LOADING
    go.set()
    b = b_started(60).run()
    assert a.run() is a.version and _same_objects(a.version, b) and manager.backend.fills == 1


def test_a_third_load_of_the_same_files_waits_on_the_reader_not_on_a_waiter(manager, tmp_path):
    """Only a version that reads is waited on: a third load of the same files joins the first reader,
    not the one waiting on it."""
    path = str(versioned_model(tmp_path, 1))
    first = manager.start_load("a", path, version="v1")
    second = manager.start_load("b", path, version="v1")
    third = manager.start_load("c", path, version="v1")
    assert second.version.shares == third.version.shares == "a@v1"
    waits = [started(second.run), started(third.run)]
    a = first.run()
    b, c = (w(60) for w in waits)
    assert _same_objects(a, b) and _same_objects(a, c) and manager.backend.fills == 1


def _stored_a_and_b(tmp_path, edit=None) -> tuple[str, Path, Path, dict[str, list[int]]]:
    """A daemon that loaded the same files as a and b (b aliased prod) and went away: (its socket, its
    state file, the model, the fds the service manager hands back). ``edit`` sees the state file's
    record first (and asserts on it, or changes it)."""
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    path = versioned_model(tmp_path, 1)
    m1 = ModelManager(CpuBackend(memory_limit=64 * MiB))
    try:
        m1.load("a", str(path), version="v1")
        m1.load("b", str(path), version="v1", alias="prod")
        p1 = Persister(m1, state, sock, fdstore=True)
        received = hand_over_fds(m1, p1, ("a@v1", "b@v1"))  # each version's fds under its own names
        doc = p1.snapshot()
        if edit is not None:
            edit(doc)
        statefile.save(state, doc)
    finally:
        m1.close()  # the old daemon is gone; the fds handed over keep the memory
    return sock, state, path, received


def test_a_restart_from_the_fd_store_keeps_the_memory_shared(tmp_path):
    def recorded(doc: dict) -> None:
        assert [(v["name"], v["shares"], v["shares_allocations"]) for v in doc["versions"]] == [
            ("a", "", ""),
            ("b", "a@v1", "a@v1"),
        ]

    sock, state, path, received = _stored_a_and_b(tmp_path, recorded)
    backend = CountingBackend(memory_limit=64 * MiB)
    m2 = ModelManager(backend)
    try:
        report = restore(m2, backend, Persister(m2, state, sock, fdstore=True), received)
        assert sorted(report.restored) == ["a@v1", "b@v1"], report.note
        a, b = m2.get("a", "v1"), m2.get("b", "v1")
        assert _same_objects(a, b) and b.shares == "a@v1"
        assert all(not fds for fds in received.values())  # every fd handed back was taken (or closed)
        one_copy = a.resident_bytes
        assert m2.resident_bytes() == backend._resident == one_copy  # counted once after the restart
        assert m2.aliases() == {"prod": "b@v1"}
        m2.unload("a")
        assert _equal_to_file(_read_all(m2, "b@v1"), path)
        m2.remove_alias("prod")
        m2.unload("b")
        assert backend._resident == 0 and list(backend.closes.values()) == [1]
    finally:
        m2.close()


def test_a_state_file_without_the_shared_record_restores_each_version_on_its_own_fds(tmp_path):
    def as_before_shared_memory(doc: dict) -> None:
        for v in doc["versions"]:
            del v["shares"], v["shares_allocations"]

    sock, state, path, received = _stored_a_and_b(tmp_path, as_before_shared_memory)

    m2 = ModelManager(CpuBackend(memory_limit=64 * MiB))
    try:
        report = restore(m2, m2.backend, Persister(m2, state, sock, fdstore=True), received)
        assert sorted(report.restored) == ["a@v1", "b@v1"], report.note
        a, b = m2.get("a", "v1"), m2.get("b", "v1")
        assert not set(map(id, _allocs(a))) & set(map(id, _allocs(b))) and not b.shares
        assert m2.resident_bytes() == 2 * a.resident_bytes
        assert _equal_to_file(_read_all(m2, "b@v1"), path)
    finally:
        m2.close()


def test_same_files_is_by_inode_size_mtime_and_fingerprint_not_by_path():
    from hotweightsd.core.content import ContentId, FileId

    a = ContentId("fp", (FileId("/m/x.safetensors", 10, 5, 7, 1), FileId("/m/y.safetensors", 20, 5, 8, 1)))
    elsewhere = ContentId("fp", (FileId("/n/b.safetensors", 20, 5, 8, 1), FileId("/n/a.safetensors", 10, 5, 7, 1)))
    assert a.same_files(elsewhere) and elsewhere.same_files(a)
    for other in (
        ContentId("other", elsewhere.files),
        ContentId("fp", (a.files[0],)),
        ContentId("fp", (a.files[0], FileId("/m/y.safetensors", 20, 6, 8, 1))),  # mtime
        ContentId("fp", (a.files[0], FileId("/m/y.safetensors", 20, 5, 9, 1))),  # inode
        ContentId("fp", (a.files[0], FileId("/m/y.safetensors", 20, 5, 8, 2))),  # another filesystem
        ContentId("fp", (a.files[0], a.files[0])),  # a multiset, not a set
    ):
        assert not a.same_files(other), other
    # restored from a state file written before the device was recorded: never taken for the same files
    old = ContentId.from_json({"fingerprint": "fp", "files": [[f.path, f.size, f.mtime_ns, f.inode] for f in a.files]})
    assert old is not None and old.files[0].dev == -1 and not old.same_files(a) and not old.same_files(old)
    assert ContentId.from_json(a.to_json()) == a


def test_keeping_the_previous_version_is_allowed_when_the_new_one_shares_its_memory(tmp_path):
    """Keep-previous falls back to no when memory is short; a new version sharing the previous one's
    memory needs nothing more, so it is kept however little is free."""
    path = versioned_model(tmp_path, 1)
    probe = ModelManager(CountingBackend(memory_limit=64 * MiB))
    size = probe.load("p", str(path.parent), version="v1").resident_bytes
    probe.close()
    m = ModelManager(CountingBackend(memory_limit=size + size // 2))  # room for one copy, not two
    try:
        a = m.load("a", str(path.parent), version="v1")
        allowed, why = m.keep_allowed(a)  # a version of its own: another copy would not fit
        assert not allowed and "keep-previous falls back to no" in why
        b = m.load("b", str(path.parent), version="v1")
        assert b.shares == "a@v1" and m.keep_allowed(b) == (True, "")
    finally:
        m.close()
