"""The fault plan (hotweightsd/core/faults.py): its syntax, which checks fail, its config key; and what a
load failing at each stage leaves in this process: the manager on the cpu backend (a file truncated or
removed under a load too), the native engine in host mode, the cuda backend on the fake driver of
support/fake_cuda.py."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from hotweights import errors
from hotweights.testing import fd_targets, fds_under, wait_until
from hotweightsd import threadnames
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.config import load_config
from hotweightsd.core import faults
from hotweightsd.core.faults import FaultPlan
from hotweightsd.core.layout import Segment
from hotweightsd.core.manager import ModelManager
from hotweightsd.loaders import native
from hotweightsd.loaders.plan import plan_chunks
from support import fake_cuda


def checks(plan: FaultPlan, point: str, n: int) -> list[int]:
    """The numbers (1-based) of the first ``n`` checks of ``point`` that fail."""
    failed = []
    for k in range(1, n + 1):
        try:
            plan.check(point)
        except errors.InjectedFault as exc:
            assert exc.details == {"point": point, "check": k}
            failed.append(k)
    return failed


def test_an_empty_plan_fails_nothing():
    for text in ("", " ", ",,"):
        plan = FaultPlan.parse(text)
        assert not plan
        assert all(checks(plan, p, 5) == [] for p in faults.POINTS)
    faults.hit("load.read")  # the daemon's plan by default: empty


def test_after_and_times_choose_the_checks_that_fail():
    plan = FaultPlan.parse("load.read:after=3:times=2, load.header, load.copy:times=3")
    assert checks(plan, "load.read", 8) == [4, 5]
    assert checks(plan, "load.header", 3) == [1]
    assert checks(plan, "load.copy", 5) == [1, 2, 3]
    assert checks(plan, "load.verify", 3) == []
    assert plan.describe() == "load.read:after=3:times=2,load.header:after=0:times=1,load.copy:after=0:times=3"


def test_an_injected_fault_is_an_internal_error_of_its_own_class():
    plan = FaultPlan.parse("load.verify")
    with pytest.raises(errors.InjectedFault, match=r"injected fault at load.verify, check 1 \(rank 0\)") as info:
        plan.check("load.verify", "rank 0")
    assert isinstance(info.value, errors.Internal)
    assert errors.error_class("InjectedFault") is errors.InjectedFault


@pytest.mark.parametrize(
    "text, message",
    [
        ("load.raed", "unknown point 'load.raed'"),
        ("read", "unknown point 'read'"),
        ("load.read:after", "'after' in 'load.read:after' is not after=N"),
        ("load.read:after=-1", "'after=-1'"),
        ("load.read:after=x", "'after=x'"),
        ("load.read:every=2", "'every=2'"),
        ("load.read:times=0", "times must be at least 1"),
        ("load.read,load.read:after=2", "point 'load.read' given twice"),
    ],
)
def test_bad_syntax_is_a_typed_error_naming_the_problem(text, message):
    with pytest.raises(errors.InvalidArgument, match=message.replace("(", r"\(")):
        FaultPlan.parse(text)


def test_chunk_counts_the_checks_of_a_native_fill():
    plan = FaultPlan.parse("load.copy:after=5")
    assert plan.chunk(3) is None  # chunks 0-2: checks 1-3
    assert plan.chunk(10) == (2, "load.copy", 6)  # check 6 is the third chunk of this fill
    assert plan.chunk(10) is None
    plan = FaultPlan.parse("load.read:after=1,load.copy:after=1")
    assert plan.chunk(4) == (1, "load.read", 2)  # a chunk is read before it is copied
    assert FaultPlan().chunk(4) is None


def test_active_installs_a_plan_for_a_block():
    with faults.active("load.header") as plan:
        assert faults.current() is plan
        with pytest.raises(errors.InjectedFault):
            faults.hit("load.header")
        faults.hit("load.header")  # times=1
    assert not faults.current()


def test_the_config_key_is_checked_at_start():
    assert load_config("none", env={}).faults == ""
    cfg = load_config("none", env={"HOTWEIGHTS_FAULTS": "load.copy:after=2"})
    assert cfg.faults == "load.copy:after=2"
    assert load_config("none", {"faults": "load.verify"}, env={}).faults == "load.verify"
    with pytest.raises(errors.InvalidArgument, match=r"faults \(env HOTWEIGHTS_FAULTS\): faults: unknown point"):
        load_config("none", env={"HOTWEIGHTS_FAULTS": "load.nothing"})


# ---- what a failed load leaves in this process (the manager and the cpu backend, in-process) ------------


@pytest.fixture(autouse=True)
def _collected():
    """What earlier tests in this process left for the collector goes before this one counts memfds."""
    gc.collect()


@pytest.fixture(autouse=True)
def _named_threads():
    """Threads started here name themselves for the OS, as in the daemon (C readers inherit the name of
    the thread that starts them), so that own_memory counts only the loaders' threads: in a full run
    this process also holds gRPC threads of earlier tests, which start and end on their own schedule."""
    threadnames.name_threads()
    yield
    threading.setprofile(None)  # type: ignore[arg-type]


def _hw_threads() -> int:
    """This process's threads named by the daemon's code (``hw-*``), read from /proc."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().startswith("hw-")
        except FileNotFoundError:  # ended meanwhile
            continue
    return n


def own_memory() -> dict[str, int]:
    """This process's memfds (open fds and mappings) and the daemon code's threads, read from /proc."""
    fds = fd_targets()
    with open("/proc/self/maps") as f:
        maps = [ln for ln in f if "memfd:hotweights" in ln]
    return {
        "memfd fds": sum("memfd:hotweights" in t for t in fds),
        "memfd mappings": len(maps),
        "threads": _hw_threads(),
    }


def write_sharded(root: Path, ranks: int = 2, parts: int = 1, tensors: int = 6, numel: int = 300_000) -> Path:
    """``model-rank-{r}-part-{p}.safetensors``: ``tensors`` float32 tensors of ``numel`` each per file."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for r in range(ranks):
        for p in range(parts):
            data = {f"p{p}.w{i}": rng.standard_normal(numel, dtype=np.float32) for i in range(tensors)}
            save_file(data, str(root / f"model-rank-{r}-part-{p}.safetensors"))
    return root


def settles(expected: dict[str, int], what: str) -> None:
    """Waits for this process's memfds and threads to be ``expected``: a joined thread leaves /proc a
    moment after its join returns, later on a loaded machine."""
    last: list[dict[str, int]] = []

    def same() -> bool:
        last[:] = [own_memory()]
        return last[0] == expected

    wait_until(same, 30.0, f"{what}: memfds and threads back to {expected}", context=lambda: last)


def test_a_file_truncated_under_a_load_is_refused_and_leaves_nothing(tmp_path):
    """The read fails part way (the file shrank after its header was read): BadCheckpoint, and the memfds,
    their mappings, the backend's count and the reader threads are gone once the load returns, even while
    the error (its traceback holds the reader's frames) is still alive."""
    ckpt = write_sharded(tmp_path / "m")
    backend = CpuBackend(threads=4)
    manager = ModelManager(backend)
    before = own_memory()
    mv, run = manager.begin_load("m", str(ckpt))
    victim = ckpt / "model-rank-1-part-0.safetensors"
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(errors.BadCheckpoint, match="rank-1-part-0.safetensors: truncated") as info:
        run()
    assert info.value.__traceback__ is not None  # kept alive on purpose, as a caller holding the error does
    assert backend._resident == 0 and manager.resident_bytes() == 0
    assert mv.state.value == "FAILED" and mv.freed
    settles(before, "after the truncated load")
    manager.close()


def test_a_file_removed_under_a_load_is_read_from_the_file_opened_and_leaves_nothing(tmp_path):
    """The rank's second file is unlinked between the header check and the fill: the fill reads the
    file the load opened and checked (never a second lookup by path), and once the load ends the
    daemon holds none of the checkpoint's files."""
    ckpt = write_sharded(tmp_path / "m", ranks=1, parts=2)
    second = ckpt / "model-rank-0-part-1.safetensors"
    manager = ModelManager(CpuBackend(threads=2))
    fds = len(os.listdir("/proc/self/fd"))
    before = own_memory()
    mv, run = manager.begin_load("m", str(ckpt))
    second.unlink()
    assert run() is mv and mv.state.value == "READY"
    held = fd_targets()
    assert not [t for t in held if t.startswith(str(ckpt))], held
    manager.close()
    settles(before, "after the load whose file was unlinked, once it was unloaded")
    assert mv.freed
    # At most, not exactly: another thread of this process (an earlier test's channel) may close one.
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds, 5.0, f"this process's fd count back to {fds}")


def test_an_injected_fault_at_each_stage_in_process_leaves_nothing(tmp_path):
    ckpt = write_sharded(tmp_path / "m")
    # the victim reads a copy: the very same files would share base's memory and read nothing
    victim = shutil.copytree(ckpt, tmp_path / "copy")
    backend = CpuBackend(threads=4)
    manager = ModelManager(backend)
    start = own_memory()
    manager.load("base", str(ckpt), version="v")
    settles({**start, "memfd fds": start["memfd fds"] + 2}, "after the first load")
    before = own_memory()
    resident = backend._resident
    # per load: 2 allocations (a rank each), 12 reads (6 tensors a rank), one verify
    for point, after in [("load.allocate", 1), ("load.read", 5), ("load.copy", 5), ("load.verify", 0)]:
        with faults.active(f"{point}:after={after}"):
            with pytest.raises(errors.InjectedFault, match=f"injected fault at {point}") as info:
                manager.load("victim", str(victim), version=point)
        assert info.value.__traceback__ is not None
        assert backend._resident == resident, point
        settles(before, point)
    manager.close()


# ---- the native engine (hwfill.c) in host mode: the fault is a chunk index and a stage in its job -------


@pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}")
@pytest.mark.parametrize("point", ["load.read", "load.copy"])
def test_the_native_engine_fails_the_chunk_it_is_told_and_stops(tmp_path, point):
    chunk = 64 * 1024
    data = os.urandom(10 * chunk)
    (tmp_path / "f.bin").write_bytes(data)
    chunks = plan_chunks([Segment(0, 0, len(data), 0, 0)], chunk)
    assert len(chunks) == 10
    dest = (ctypes.c_char * len(data))()
    ring = mmap.mmap(-1, 2 * chunk)  # one reader, two slots
    anchor = ctypes.c_char.from_buffer(ring)
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    threads = own_memory()["threads"]
    plan = FaultPlan.parse(f"{point}:after=13")
    try:
        assert plan.chunk(len(chunks)) is None  # a first fill: checks 1-10 pass
        fault = plan.chunk(len(chunks))
        assert fault == (3, point, 14)
        with pytest.raises(errors.InjectedFault, match=rf"injected fault at {point}, check 14 \(.*f\.bin at 196608\)"):
            native.fill(
                chunks,
                [fd],
                [False],
                [str(tmp_path / "f.bin")],
                [ctypes.addressof(dest)],
                threads=1,
                depth=2,
                slot_size=chunk,
                host_base=ctypes.addressof(anchor),
                progress=lambda n: None,
                cancel=threading.Event(),
                host_mode=True,
                fault=fault,
            )
    finally:
        os.close(fd)
        del anchor
        ring.close()
    got = bytes(dest)
    assert got[: 3 * chunk] == data[: 3 * chunk]  # the chunks before it landed
    assert got[3 * chunk :] == bytes(len(data) - 3 * chunk)  # it and every later one did not
    settles({**own_memory(), "threads": threads}, "the native fill's threads")


# ---- the cuda backend on the fake driver of support/fake_cuda.py: the bounce path and GDS, in CI ---------

fake, fake_cufile = fake_cuda.fake, fake_cuda.fake_cufile  # its fixtures


def fake_device(drv, cufile) -> dict[str, int]:
    """What the fake driver and cuFile hold: physical allocations, handles, mapped ranges, registrations."""
    return {
        "bytes": drv.used(0),
        "physical": len(drv.phys),
        "handles": len(drv.handles),
        "mapped ranges": sum(1 for v in drv.vas.values() if v["phys"] is not None),
        "cufile handles": len(cufile.handles),
    }


@pytest.mark.parametrize("gds", ["off", "compat"])
@pytest.mark.parametrize("point", faults.POINTS)
def test_a_cuda_load_failing_at_each_stage_leaves_the_device_as_it_was(fake, fake_cufile, tmp_path, gds, point):
    """The python workers of the bounce path (the native engine needs the real driver) and GDS."""
    path = tmp_path / "m.safetensors"
    fake_cuda.write_ckpt(path)
    # the victim reads a copy: the very same file would share base's memory and read nothing
    victim = shutil.copy(path, tmp_path / "copy.safetensors")
    backend = fake_cuda.make_backend(threads=2, chunk_size=64 * 1024, gds=gds)
    manager = ModelManager(backend)
    mine = own_memory()
    first = manager.load("base", str(path), version="v1")
    assert first.load_path.startswith("gds" if gds == "compat" else "bounce"), first.load_path
    settles(mine, "after the first load")
    device, free, fds = fake_device(fake, fake_cufile), backend.devices()[0].free, fds_under(tmp_path)
    with faults.active(f"{point}:after={2 if point in ('load.read', 'load.copy') else 0}"):
        with pytest.raises(errors.InjectedFault, match=f"injected fault at {point}"):
            manager.load("victim", str(victim), version="v1")
    assert fake_device(fake, fake_cufile) == device
    assert backend.devices()[0].free == free
    settles(mine, f"{point} on the cuda backend")
    assert fds_under(tmp_path) == fds
    assert fake._stack() == [], "the calling thread's contexts are as they were"
    manager.load("victim", str(victim), version="v1")  # and the backend still loads
    manager.close()
