"""The registry's lifecycle where operations overlap or fail midway (real memfd backend, no gRPC): a
restart's reload keeps the state file whole until each reload settles, a lease belongs to the version
object it was granted (never to a later one loaded under the same key), a drain swap whose next version
fails leaves its alias saying why, and a version force-unloaded while it drains ends the drain at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hotweights import errors
from hotweights.testing import wait_until
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core import faults
from hotweightsd.core.faults import FaultPlan
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import State
from hotweightsd.core.swap import SwapMode, swap
from hotweightsd.persist import statefile
from hotweightsd.persist.fdstore import Persister
from hotweightsd.persist.restore import restore
from support.ckpt_tools import versioned_model

MiB = 2**20


def _manager() -> ModelManager:
    return ModelManager(CpuBackend(memory_limit=256 * MiB))


def _state(path: Path) -> tuple[list[str], dict[str, str], list[list[str]]]:
    doc = statefile.load(path)
    versions = sorted(f"{v['name']}@{v['version']}" for v in doc["versions"])
    return versions, doc["aliases"], [r["fd_names"] for v in doc["versions"] for r in v["ranks"]]


def test_a_restart_that_reloads_from_storage_keeps_the_state_file_whole_until_each_reload_settles(tmp_path):
    sock, state = str(tmp_path / "hw.sock"), tmp_path / "hw.sock.state.json"
    m1 = _manager()
    try:
        m1.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
        m1.load("llm", str(versioned_model(tmp_path, 2)), version="v2", alias="canary")
        Persister(m1, state, sock, fdstore=False).save()
    finally:
        m1.close()

    m2 = _manager()
    p2 = Persister(m2, state, sock, fdstore=False)
    try:
        report = restore(m2, m2.backend, p2, {})  # no fd store: every version is reloaded from storage
        assert sorted(f"{i['name']}@{i['version']}" for i in report.to_reload) == ["llm@v1", "llm@v2"]
        p2.start()  # its first save finds the registry still empty
        assert p2.flush()
        # a crash now (before any reload) must find both versions and both aliases on the next start
        versions, aliases, fd_names = _state(state)
        assert versions == ["llm@v1", "llm@v2"]
        assert aliases == {"prod": "llm@v1", "canary": "llm@v2"}
        assert fd_names == [[], []]  # nothing of theirs is in an fd store: a later start reloads them
        again = restore(_manager(), m2.backend, Persister(_manager(), state, sock, fdstore=False), {})
        assert sorted(i["name"] + "@" + i["version"] for i in again.to_reload) == ["llm@v1", "llm@v2"]

        m2.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
        p2.settled("llm@v1")
        assert p2.flush()
        assert _state(state)[:2] == (["llm@v1", "llm@v2"], {"prod": "llm@v1", "canary": "llm@v2"})

        p2.settled("llm@v2")  # its reload failed: the registry alone speaks for it, and has nothing
        assert p2.flush()
        assert _state(state)[:2] == (["llm@v1"], {"prod": "llm@v1"})
    finally:
        p2.close()
        m2.close()


def test_a_lease_is_never_served_by_a_version_loaded_later_under_the_same_key(tmp_path):
    m = _manager()
    try:
        m.load("m", str(versioned_model(tmp_path, 1)), version="v")
        lease = m.open_lease("m@v")
        m.unload("m@v", force=True)
        newer = m.load("m", str(versioned_model(tmp_path, 2)), version="v")  # other files, the same key
        with pytest.raises(errors.NotFound, match=r"m@v was unloaded \(forced\) while leased"):
            m.get_handles(lease.id, 0, lease.key)
        assert not newer.leases
        m.close_lease(lease.id)  # ends the old grant without touching the newer version
        assert newer.state is State.READY and not newer.freed
        held = sum(a.size for r in newer.ranks for a in r.allocations)
        assert m.unload("m@v") == (["m@v"], held)  # nobody leases it: a plain unload frees it, all counted
    finally:
        m.close()


def _fail_a_drain_swap(m: ModelManager, tmp_path: Path, monkeypatch) -> None:
    """prod -> llm@v1, then a drain swap to llm@v2 whose load fails its last stage: prod names nothing."""
    m.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
    monkeypatch.setattr(faults, "_plan", FaultPlan.parse("load.verify"))
    with pytest.raises(errors.InjectedFault):
        swap(m, "prod", str(versioned_model(tmp_path, 2)), version="v2", mode=SwapMode.DRAIN).run()
    monkeypatch.setattr(faults, "_plan", FaultPlan.parse(""))


def test_a_drain_swap_whose_next_version_fails_leaves_its_alias_saying_why(tmp_path, monkeypatch):
    m = _manager()
    try:
        _fail_a_drain_swap(m, tmp_path, monkeypatch)
        assert m.aliases() == {"prod": "llm@v1"}
        # not "between versions, retry shortly" for ever: what happened, and how to mend it
        with pytest.raises(
            errors.FailedPrecondition, match=r"llm@v1, which its drain swap freed before the next version failed"
        ):
            m.resolve("prod")
        with pytest.raises(errors.FailedPrecondition, match="injected fault"):
            m.open_lease("prod")
        # a second swap mends it, drain or not (there is nothing left to drain)
        mended = swap(m, "prod", str(versioned_model(tmp_path, 3)), version="v3", mode=SwapMode.DRAIN).run()
        assert m.aliases() == {"prod": "llm@v3"} and m.resolve("prod") is mended
    finally:
        m.close()


def test_a_version_force_unloaded_while_it_drains_ends_the_drain_at_once(tmp_path):
    m = _manager()
    try:
        m.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
        m.open_lease("prod")
        v1 = m.get("llm", "v1")
        outcome: list[BaseException] = []

        def drain() -> None:
            try:
                swap(m, "prod", str(versioned_model(tmp_path, 2)), version="v2", mode=SwapMode.DRAIN, drain_timeout=600)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=drain)
        t.start()
        wait_until(lambda: v1.state is State.DRAINING, 30, "the drain to begin")
        m.unload("llm@v1", force=True)
        t.join(60)  # far below the drain's own 600 s: the unload ends it
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], errors.Aborted), outcome
        assert "unloaded while it drained" in str(outcome[0])
        assert v1.state is State.UNLOADING  # not set back to READY on an object that is gone
        assert m.versions() == [] and m.aliases() == {}
    finally:
        m.close()


def test_while_a_drain_swap_loads_its_alias_is_between_versions_and_a_second_swap_is_refused(tmp_path, monkeypatch):
    m = _manager()
    try:
        _fail_a_drain_swap(m, tmp_path, monkeypatch)
        m.load("llm", str(versioned_model(tmp_path, 1)), version="v1")  # the alias works again, by itself
        assert m.resolve("prod").key == "llm@v1"

        # A later drain swap, planned (old version drained, the next registered) but not yet loaded: the
        # earlier failure says nothing about it, and no second swap may race it for the alias.
        plan = swap(m, "prod", str(versioned_model(tmp_path, 3)), version="v3", mode=SwapMode.DRAIN)
        with pytest.raises(errors.Unavailable, match="between versions"):
            m.resolve("prod")
        for mode in (SwapMode.DRAIN, SwapMode.SIDE_BY_SIDE):
            with pytest.raises(errors.Unavailable, match="a drain swap is loading its next version"):
                swap(m, "prod", str(versioned_model(tmp_path, 4)), version="v4", mode=mode)
        with pytest.raises(errors.Unavailable, match="a drain swap is loading its next version"):
            swap(m, "prod", "llm@v3")
        plan.run()
        assert m.aliases() == {"prod": "llm@v3"}
        assert sorted(v.key for v in m.versions()) == ["llm@v2", "llm@v3"]  # v2: the FAILED load, listed
    finally:
        m.close()


def test_a_drain_swap_whose_new_version_goes_before_the_alias_moves_leaves_the_alias_saying_why(tmp_path):
    m = _manager()
    try:
        m.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")

        def unload_at_ready(ev) -> None:  # an operator's forced unload, just as the new version turns READY
            if ev.kind.value == "VERSION_READY" and ev.version == "v2":
                m.unload("llm@v2", force=True)

        m.events.subscribe(unload_at_ready)
        with pytest.raises(errors.NotFound):
            swap(m, "prod", str(versioned_model(tmp_path, 2)), version="v2", mode=SwapMode.DRAIN).run()
        with pytest.raises(errors.FailedPrecondition, match="which its drain swap freed"):
            m.resolve("prod")
    finally:
        m.close()


def test_a_drain_swap_that_times_out_keeps_the_version_kept_for_a_rollback(tmp_path):
    m = ModelManager(CpuBackend(memory_limit=256 * MiB), keep_previous_seconds=600)
    try:
        m.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
        m.load("llm", str(versioned_model(tmp_path, 2)), version="v2")
        swap(m, "prod", "llm@v2", keep_previous=True).run()
        m.open_lease("prod")  # keeps v2 from draining
        with pytest.raises(errors.DeadlineExceeded, match="nothing was changed"):
            swap(m, "prod", str(versioned_model(tmp_path, 3)), version="v3", mode=SwapMode.DRAIN, drain_timeout=0.1)
        mv, old, _ = m.rollback("prod")  # still there to roll back to
        assert (mv.key, old) == ("llm@v1", "llm@v2")
    finally:
        m.close()
