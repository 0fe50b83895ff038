"""What runs under the registry lock, and what a decision taken under it may rely on once it is released
(in-process, a real memfd backend, no gRPC): no log line is written while the lock is held, the first
attach of one model never waits for another model's handle table to be encoded, and a drain swap's final
move of its alias is a compare-and-set against what happened while it loaded (and a drain swap is refused
up front where another alias names the version it would free)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_no_blocking import within

from hotweights import errors
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core import loading, state
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import State
from hotweightsd.core.swap import SwapMode, swap
from hotweightsd.server import convert
from hotweightsd.server.service import HotweightsService
from support.ckpt_tools import write_model

GUARD_S = 10.0  # a safety limit only: every wait below ends on an event the test sets

MiB = 2**20


def _manager() -> ModelManager:
    return ModelManager(CpuBackend(memory_limit=256 * MiB))


def _lock_free_elsewhere(m: ModelManager) -> bool:
    """Whether another thread could take the registry lock right now (it is reentrant, so ask from another)."""
    out: list[bool] = []

    def probe() -> None:
        got = m._lock.acquire(blocking=False)
        if got:
            m._lock.release()
        out.append(got)

    t = threading.Thread(target=probe)
    t.start()
    t.join(GUARD_S)
    return out == [True]


class _RecordingLog:
    """Stands in for the manager's logger: records, per event, whether the registry lock was free."""

    def __init__(self, m: ModelManager, real: Any) -> None:
        self.m, self.real = m, real
        self.free: dict[str, list[bool]] = {}

    def __getattr__(self, level: str) -> Any:
        def emit(event: str, **kw: Any) -> None:
            self.free.setdefault(event, []).append(_lock_free_elsewhere(self.m))
            getattr(self.real, level)(event, **kw)

        return emit


def test_a_load_that_rejoins_a_concurrent_load_of_the_same_files_logs_outside_the_registry_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two loads of ``b@v1`` from the files ``a@v1`` was read from pass the first "already loaded?" check
    together; the second to take the lock in ``_share`` finds the first registered and rejoins it there."""
    m = _manager()
    try:
        path = str(write_model(tmp_path / "w.safetensors", seed=1))
        m.load("a", path, version="v1")
        both_verified = threading.Barrier(2, timeout=GUARD_S)
        real_verify = m.verify

        def verify(ckpt, level):  # both loads have passed the first _existing check by now
            real_verify(ckpt, level)
            both_verified.wait()

        monkeypatch.setattr(m, "verify", verify)
        recorder = _RecordingLog(m, loading.log)
        for part in (loading, state):  # lines logged directly, and those an effect writes once the lock is free
            monkeypatch.setattr(part, "log", recorder)
        results: list[Any] = []
        loads = [threading.Thread(target=lambda: results.append(m.load("b", path, version="v1"))) for _ in range(2)]
        for t in loads:
            t.start()
        for t in loads:
            t.join(GUARD_S)
        assert [mv.key for mv in results] == ["b@v1", "b@v1"]
        assert recorder.free.get("load.already_loaded") == [True], recorder.free
    finally:
        m.close()


def test_the_first_attach_of_one_model_does_not_wait_for_another_models_table_to_be_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoding of ``big``'s table waits until the test opens a gate: ``small``'s first attach is
    answered meanwhile, and a second first attach of ``big`` waits for that one encoder, not encoding
    the same table again."""
    m = _manager()
    service = HotweightsService(m, str(tmp_path / "hw.sock"), str(tmp_path / "hw.fds"))
    try:
        for name, seed in (("big", 1), ("small", 2)):
            m.load(name, str(write_model(tmp_path / f"{name}.safetensors", seed=seed)), version="v1")
        big = [m.open_lease("big@v1") for _ in range(2)]
        small = m.open_lease("small@v1")
        gate, entered = threading.Event(), threading.Event()
        encoded: list[str] = []
        real_template = convert.handles_template

        def waiting_template(mv, rank, fd_socket, compact):
            encoded.append(mv.key)
            if mv.name == "big":
                entered.set()
                gate.wait(60)  # a safety limit only: the test opens the gate
            return real_template(mv, rank, fd_socket, compact)

        monkeypatch.setattr(convert, "handles_template", waiting_template)
        attaches = [
            threading.Thread(target=service._handles, args=(le.id, le.key, 0, False), daemon=True) for le in big
        ]
        attaches[0].start()
        try:
            assert entered.wait(GUARD_S), "big's table was never encoded"
            attaches[1].start()
            answer = within(lambda: service._handles(small.id, small.key, 0, False))
            assert answer.ticket and not gate.is_set(), "small was answered while big's table was encoding"
        finally:
            gate.set()
        for t in attaches:
            t.join(GUARD_S)
            assert not t.is_alive()
        assert sorted(encoded) == ["big@v1", "small@v1"]  # one encoder for big's table
        assert service.tables.encoding() == 0
    finally:
        gate.set()
        service.close()
        m.close()


class _SlowFill(CpuBackend):
    """The read of a checkpoint whose path holds ``slow`` waits until the test opens ``gate``."""

    def __init__(self) -> None:
        super().__init__(memory_limit=256 * MiB)
        self.entered, self.gate = threading.Event(), threading.Event()

    def fill(self, layout, allocations, progress, cancel):
        if "slow" in str(layout.files):
            self.entered.set()
            self.gate.wait(60)  # a safety limit only: the test opens the gate
        return super().fill(layout, allocations, progress, cancel)


def _run_in_thread(plan) -> tuple[list[BaseException | str], threading.Thread]:
    """Runs a swap plan in a thread of its own: (what it returned or raised, once it has; the thread)."""
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            outcome.append(plan.run().key)
        except BaseException as exc:
            outcome.append(exc)

    swapping = threading.Thread(target=run)
    swapping.start()
    return outcome, swapping


@pytest.mark.parametrize("how", ["set-alias", "load-alias", "remove"])
def test_an_alias_moved_while_its_drain_swap_loads_is_left_where_it_was_moved(tmp_path: Path, how: str) -> None:
    backend = _SlowFill()
    m = ModelManager(backend)
    try:
        v2 = str(write_model(tmp_path / "v2.safetensors", seed=2))
        m.load("m", str(write_model(tmp_path / "v1.safetensors", seed=1)), version="v1", alias="prod")
        m.load("m", v2, version="v2")
        plan = swap(
            m, "prod", str(write_model(tmp_path / "slow.safetensors", seed=3)), version="v3", mode=SwapMode.DRAIN
        )
        outcome, swapping = _run_in_thread(plan)
        try:
            assert backend.entered.wait(GUARD_S), "the drain swap never started to read"
            if how == "set-alias":
                assert m.set_alias("prod", "m@v2") == ("m@v1", "m@v2")  # answered as done
            elif how == "load-alias":
                m.load("m", v2, version="v2", alias="prod")
            else:
                m.remove_alias("prod")
        finally:
            backend.gate.set()
        swapping.join(GUARD_S)
        [err] = outcome
        assert isinstance(err, errors.FailedPrecondition), err
        where = "removed" if how == "remove" else "moved to m@v2"
        assert f"alias 'prod' was {where} while this drain swap loaded m@v3" in err.message
        assert "m@v3 was retired" in err.message
        assert m.aliases() == ({} if how == "remove" else {"prod": "m@v2"})
        assert [v.key for v in m.versions()] == ["m@v2"]  # v3 retired with no lease: freed at once
        assert m.drain_swap_failure("prod") is None
        if how != "remove":
            assert m.resolve("prod").key == "m@v2"
    finally:
        backend.gate.set()
        m.close()


def test_an_alias_moved_meanwhile_leaves_a_version_the_drain_swap_did_not_load_resident(tmp_path: Path) -> None:
    m = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m.load("m", str(write_model(tmp_path / "v1.safetensors", seed=1)), version="v1", alias="prod")
        v2 = str(write_model(tmp_path / "v2.safetensors", seed=2))
        m.load("m", v2, version="v2")  # the operator's own load: the drain swap finds it resident
        m.load("m", str(write_model(tmp_path / "v3.safetensors", seed=3)), version="v3")
        plan = swap(m, "prod", v2, version="v2", mode=SwapMode.DRAIN)
        assert plan.already_loaded
        m.set_alias("prod", "m@v3")  # answered between the drain and the swap's move
        with pytest.raises(errors.FailedPrecondition, match="while this drain swap loaded m@v2") as e:
            plan.run()
        assert "retired" not in e.value.message
        assert [v.key for v in m.versions()] == ["m@v2", "m@v3"] and not m.get("m", "v2").retire
        assert m.aliases() == {"prod": "m@v3"}
    finally:
        m.close()


def test_a_version_an_operator_also_loaded_while_the_drain_swap_read_it_stays_when_the_alias_moved_meanwhile(
    tmp_path: Path,
) -> None:
    backend = _SlowFill()
    m = ModelManager(backend)
    try:
        m.load("m", str(write_model(tmp_path / "v1.safetensors", seed=1)), version="v1", alias="prod")
        m.load("m", str(write_model(tmp_path / "v2.safetensors", seed=2)), version="v2")
        slow = str(write_model(tmp_path / "slow.safetensors", seed=3))
        plan = swap(m, "prod", slow, version="v3", mode=SwapMode.DRAIN)
        outcome, swapping = _run_in_thread(plan)
        try:
            assert backend.entered.wait(GUARD_S), "the drain swap never started to read"
            # The operator's own load of the same files joins the read in flight: it is answered as
            # loaded, so the version is the operator's too and no later turn of the swap may free it.
            mine = m.start_load("m", slow, version="v3")
            assert mine.already_loaded
            m.set_alias("prod", "m@v2")
        finally:
            backend.gate.set()
        swapping.join(GUARD_S)
        assert mine.run().key == "m@v3"
        [err] = outcome
        assert isinstance(err, errors.FailedPrecondition), err
        assert "retired" not in err.message
        v3 = m.get("m", "v3")
        assert v3.state is State.READY and not v3.retire and not v3.freed
        assert [v.key for v in m.versions()] == ["m@v2", "m@v3"]
    finally:
        backend.gate.set()
        m.close()


@pytest.mark.parametrize("loaded_twice", [False, True], ids=["once", "loaded-again-long-before"])
def test_a_rollback_spare_the_drain_swap_took_back_is_retired_again_when_its_alias_moved_meanwhile(
    tmp_path: Path, loaded_twice: bool
) -> None:
    m = ModelManager(CpuBackend(memory_limit=256 * MiB), keep_previous_seconds=600)
    try:
        va = str(write_model(tmp_path / "a.safetensors", seed=1))
        m.load("m", va, version="va", alias="other")
        if loaded_twice:  # a load joined it once, before this swap: no claim on what the swap takes back
            m.load("m", va, version="va")
        m.load("m", str(write_model(tmp_path / "b.safetensors", seed=2)), version="vb")
        swap(m, "other", "m@vb", keep_previous=True).run()  # va: other's rollback spare
        m.load("m", str(write_model(tmp_path / "p.safetensors", seed=3)), version="vp", alias="prod")
        m.load("m", str(write_model(tmp_path / "q.safetensors", seed=4)), version="vq")
        plan = swap(m, "prod", va, version="va", mode=SwapMode.DRAIN)  # finds va resident: takes it back
        m.set_alias("prod", "m@vq")  # answered between the drain and the swap's move
        with pytest.raises(errors.FailedPrecondition, match="m@va was retired"):
            plan.run()
        assert [v.key for v in m.versions()] == ["m@vb", "m@vq"]  # not resident for good with no alias
    finally:
        m.close()


def test_a_drain_swap_is_refused_while_another_alias_names_the_version_it_would_free(tmp_path: Path) -> None:
    m = _manager()
    try:
        m.load("m", str(write_model(tmp_path / "v1.safetensors", seed=1)), version="v1", alias="prod")
        m.set_alias("canary", "m@v1", create=True)
        target = str(write_model(tmp_path / "v3.safetensors", seed=3))
        with pytest.raises(errors.FailedPrecondition, match="alias\\(es\\) 'canary' name it too"):
            swap(m, "prod", target, version="v3", mode=SwapMode.DRAIN)
        v1 = m.get("m", "v1")
        with pytest.raises(errors.FailedPrecondition, match="'canary'"):
            m.drain(v1, 1.0, "prod")  # checked again where the drain starts, under the lock
        assert v1.state is State.READY and not v1.freed
        assert m.aliases() == {"prod": "m@v1", "canary": "m@v1"}
        assert [v.key for v in m.versions()] == ["m@v1"]
        assert m.resolve("canary") is v1
        m.remove_alias("canary")
        assert swap(m, "prod", target, version="v3", mode=SwapMode.DRAIN).run().key == "m@v3"
        assert m.aliases() == {"prod": "m@v3"}
    finally:
        m.close()
