"""On the cuda backend: a load failing mid-copy (and mid-read) leaves the GPU's
free memory and the daemon's fds and threads exactly as before, on the native engine and the python workers.

The real daemon (``--backend cuda``, GDS off: the bounce path, whose two engines are what differ) with a fault plan
(hotweightsd/core/faults.py) that lets a first load through and fails the second in the middle of its
chunks. Skipped (see conftest.py here) where no GPU or cuda-bindings is present.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import write_checkpoint  # noqa: E402

from hotweights import errors  # noqa: E402
from support.daemons import Daemon, short_tmpdir, start_daemon, wait_until  # noqa: E402

CHUNK = 1024 * 1024  # the loader's read, given to the daemon so that the test can count its chunks


def chunks_per_load(ckpt: Path) -> int:
    """The reads (each one check of load.read and one of load.copy) one load of ``ckpt`` makes on device 0."""
    from hotweights.cuda import devices as cd
    from hotweights.format.checkpoint import open_checkpoint
    from hotweightsd.core.layout import plan_rank
    from hotweightsd.loaders.plan import plan_chunks

    granularity = cd.vmm_granularity(0)
    return sum(len(plan_chunks(plan_rank(r, granularity).segments(), CHUNK)) for r in open_checkpoint(ckpt).ranks)


def device_free() -> int:
    import torch

    return torch.cuda.mem_get_info(0)[0]


def measures(d: Daemon) -> dict[str, int]:
    """The GPU's free memory (the daemon's allocations are the GPU's), the daemon's fds and threads (its
    pools' workers left out: their number grows without leaking, ``Daemon.threads``)."""
    return {"device free": device_free(), "fds": len(d.fds()), "threads": d.threads()}


def settled(d: Daemon, expected: dict[str, int] | None, what: str) -> dict[str, int]:
    """Waits until the measures equal ``expected`` (None: two reads in a row agree) and returns them."""
    seen: list[dict[str, int]] = []

    def check() -> dict[str, int] | None:
        now = measures(d)
        target = expected if expected is not None else (seen[-1] if seen else None)
        seen.append(now)
        return now if now == target else None

    return wait_until(
        check, 20.0, what, context=lambda: f"expected {expected}, seen last {seen[-3:]}\n{d.logs()[-3000:]}"
    )


@pytest.fixture
def sock():
    d = short_tmpdir()
    try:
        yield str(Path(d) / "hw.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("point", ["load.copy", "load.read"])
@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_cuda_load_failing_mid_copy_leaves_the_gpu_as_it_was(sock, tmp_path, engine, point):
    ckpt = write_checkpoint(tmp_path / "m", ranks=1, parts=2)
    per_load = chunks_per_load(ckpt)
    assert per_load >= 4, per_load
    failing = per_load + per_load // 2 + 1  # the middle chunk of the second load
    # the victim reads a copy: the very same files would share base's memory and read nothing
    victim = shutil.copytree(ckpt, tmp_path / "copy")
    d = start_daemon(
        sock,
        "--reserve",
        "1GiB",
        "--gds",
        "off",
        "--loader",
        "pread",
        "--chunk-size",
        str(CHUNK),
        "--loader-engine",
        engine,
        "--faults",
        f"{point}:after={failing - 1}",
        backend="cuda",
    )
    try:
        with d.connect() as c:
            first = c.load("base", str(ckpt), version="v1")
        assert ("native engine" if engine == "native" else "python workers") in first.load_path, first.load_path
        before = settled(d, None, "the daemon and the GPU at rest after the first load")
        with d.connect() as c:
            resident = c.status().resident_bytes
        assert resident > 0

        with d.connect() as c, pytest.raises(errors.InjectedFault, match=f"injected fault at {point}") as info:
            c.load("victim", str(victim), version="v1")
        assert type(info.value) is errors.InjectedFault
        settled(d, before, f"the GPU's free memory and the daemon's fds and threads after a load failing at {point}")
        with d.connect() as c:
            assert c.status().resident_bytes == resident
            # the fault fired once: the same load now goes through
            c.load("victim", str(victim), version="v1")
            assert c.status().resident_bytes == 2 * resident
            c.unload("victim")
        settled(d, before, "the GPU's free memory after the retried load was unloaded")
    finally:
        code = d.stop()
    assert code == 0, d.logs()[-3000:]
