"""A load failing at each stage (header, allocation, mid-read, mid-copy, verify)
leaves the daemon's resident memory, fds, memfds, mappings and threads exactly as they were.

Each case starts a real daemon (cpu backend) with a fault plan (``--faults``, hotweightsd/core/faults.py)
that lets one load through and fails the next at its stage; the daemon then loads the same checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hotweights import errors
from hotweights.format.checkpoint import open_checkpoint
from hotweightsd.backends.cpu import PAGE
from hotweightsd.core.layout import plan_rank
from hotweightsd.loaders.files import split
from support.daemons import Daemon, start_daemon, wait_until

RANKS = 2


def write_checkpoint(root: Path) -> Path:
    """Two ranks (so two allocations: one can fail after the other), 8 float32 tensors of 1.2 MB each."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for r in range(RANKS):
        data = {f"layer{i}.w": rng.standard_normal(300_000, dtype=np.float32) for i in range(8)}
        save_file(data, str(root / f"model-rank-{r}-part-0.safetensors"))
    return root


def checks_per_load(ckpt: Path) -> dict[str, int]:
    """How often one load of ``ckpt`` on the cpu backend checks each point."""
    layouts = [plan_rank(r, PAGE, None) for r in open_checkpoint(ckpt).ranks]
    reads = sum(len(list(split(lay.segments()))) for lay in layouts)
    allocations = sum(len(lay.allocation_sizes) for lay in layouts)
    return {"load.header": 1, "load.allocate": allocations, "load.read": reads, "load.copy": reads, "load.verify": 1}


def which_check(point: str, per_load: int) -> int:
    """The check of the second load that fails: its second allocation, the middle of its reads."""
    if point == "load.allocate":
        return 2
    if point in ("load.read", "load.copy"):
        return per_load // 2 + 1
    return 1


def proc_measures(d: Daemon) -> dict[str, int]:
    """What the daemon holds, read from /proc: fds, memfds among them, memfd mappings, threads."""
    links = d.fds()
    return {
        "fds": len(links),
        "memfds": sum("memfd:" in t for t in links),
        "memfd mappings": d.memfd_mappings(),
        "threads": d.threads(),
    }


def resident(d: Daemon) -> tuple[int, int]:
    with d.connect() as c:
        st = c.status()
    return st.resident_bytes, st.open_allocations


def settled(d: Daemon, expected: dict[str, int] | None, what: str) -> dict[str, int]:
    """Waits until the /proc measures equal ``expected`` (None: until two reads in a row agree, the daemon
    at rest) and returns them; a closed connection or a joined thread leaves /proc a moment later."""
    seen: list[dict[str, int]] = []

    def check() -> dict[str, int] | None:
        now = proc_measures(d)
        previous = seen[-1] if seen else None
        seen.append(now)
        target = expected if expected is not None else previous
        return now if now == target else None

    return wait_until(
        check, what=what, context=lambda: f"expected {expected}, seen last {seen[-3:]}\n{d.logs()[-3000:]}"
    )


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "m")


POINTS = ["load.header", "load.allocate", "load.read", "load.copy", "load.verify"]


@pytest.mark.parametrize("point", POINTS)
def test_a_load_failing_at_each_stage_leaves_nothing(sockdir, checkpoint, point):
    per_load = checks_per_load(checkpoint)[point]
    failing = per_load + which_check(point, per_load)  # counted over the daemon's life: the first load passes
    # the victim reads a copy: the very same files would share base's memory and read nothing
    victim = shutil.copytree(checkpoint, checkpoint.parent / "copy")
    d = start_daemon(str(sockdir / "hw.sock"), "--faults", f"{point}:after={failing - 1}:times=1")
    try:
        with d.connect() as c:
            c.load("base", str(checkpoint), version="v1")
        before = settled(d, None, "the daemon at rest after its first load")
        resident_before = resident(d)
        assert resident_before[0] > 0 and before["memfds"] == RANKS

        with d.connect() as c, pytest.raises(errors.InjectedFault, match=f"injected fault at {point}") as info:
            c.load("victim", str(victim), version="v1")
        assert type(info.value) is errors.InjectedFault and info.value.details["point"] == point
        settled(d, before, f"the daemon's fds, memfds, mappings and threads as before the load failing at {point}")
        assert resident(d) == resident_before

        # the fault fired once: the same load now goes through, and its memory is all there is
        with d.connect() as c:
            info_ok = c.load("victim", str(victim), version="v1")
            assert info_ok.state and c.status().resident_bytes == 2 * resident_before[0]
            c.unload("victim")
        settled(d, before, "the daemon's measures after the retried load was unloaded")
        assert resident(d) == resident_before
    finally:
        code = d.stop()
    assert code == 0, d.logs()[-3000:]


def test_a_swap_whose_load_fails_mid_copy_keeps_the_alias_and_leaks_nothing(sockdir, checkpoint):
    per_load = checks_per_load(checkpoint)["load.copy"]
    # v2 is a copy: the very same files would share v1's memory and read nothing
    copy = shutil.copytree(checkpoint, checkpoint.parent / "copy")
    d = start_daemon(str(sockdir / "hw.sock"), "--faults", f"load.copy:after={per_load + per_load // 2}")
    try:
        with d.connect() as c:
            c.load("m", str(checkpoint), version="v1", alias="prod")
        before = settled(d, None, "the daemon at rest after its first load")
        resident_before = resident(d)
        with d.connect() as c, pytest.raises(errors.InjectedFault, match="injected fault at load.copy"):
            c.swap("prod", str(copy), version="v2")
        settled(d, before, "the daemon's fds, memfds, mappings and threads as before the failed swap")
        assert resident(d) == resident_before
        with d.connect() as c:
            assert {a.alias: a.version for a in c.status().aliases} == {"prod": "v1"}
            c.swap("prod", str(copy), version="v2")  # the fault fired once
            assert {a.alias: a.version for a in c.status().aliases} == {"prod": "v2"}
    finally:
        code = d.stop()
    assert code == 0, d.logs()[-3000:]


def test_an_attach_refused_after_its_lease_opened_leaves_no_lease_and_no_fd(daemon, checkpoint):
    """The lease is opened, then its handles are refused (no such rank): the lease ends with the refusal."""
    with daemon.connect() as c:
        c.load("m", str(checkpoint), version="v1")
    before = settled(daemon, None, "the daemon at rest after its load")
    with daemon.connect() as c:
        with pytest.raises(errors.InvalidArgument, match="rank 7 does not exist"):
            c.attach("m", rank=7)
    wait_until(lambda: daemon.leases() == [], 10.0, "the refused attach's lease to end")
    settled(daemon, before, "the daemon's fds and threads as before the refused attach")


def test_the_daemons_pool_workers_carry_their_names_for_the_os_and_are_left_out_of_the_count(daemon, checkpoint):
    with daemon.connect() as c:
        c.load("m", str(checkpoint), version="v1")
        c.status()
    names = set()
    for tid in os.listdir(f"/proc/{daemon.pid}/task"):
        with open(f"/proc/{daemon.pid}/task/{tid}/comm") as f:
            names.add(f.read().strip())
    assert any(n.startswith("hw-call_") for n in names) and any(n.startswith("hw-load_") for n in names), names
    assert daemon.threads(pools=True) > daemon.threads()
