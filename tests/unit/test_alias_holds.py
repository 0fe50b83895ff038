"""Alias safety in the core alone (real memfd backend, no gRPC): aliases move only where
they exist, a swap keeps the previous version for a rollback until its hold ends, and a version
retired while leased comes back retired from the state file and the fds, then goes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotweights import errors
from hotweights.testing import wait_until
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.swap import swap
from hotweightsd.persist.fdstore import Persister
from hotweightsd.persist.restore import restore
from support.ckpt_tools import versioned_model
from support.svcmgr import hand_over_fds

MiB = 2**20


def _manager(tmp_path: Path, **kw) -> ModelManager:
    m = ModelManager(CpuBackend(memory_limit=256 * MiB), **kw)
    m.load("llm", str(versioned_model(tmp_path, 1)), version="v1", alias="prod")
    m.load("llm", str(versioned_model(tmp_path, 2)), version="v2")
    return m


def test_unknown_aliases_are_not_found_naming_the_known_ones_and_nothing_moves(tmp_path):
    m = _manager(tmp_path)
    try:
        m.set_alias("canary", "llm@v2", create=True)
        for call in (
            lambda: m.set_alias("prdo", "llm@v2"),
            lambda: swap(m, "prdo", "llm@v2"),
            lambda: m.remove_alias("prdo"),
            lambda: m.rollback("prdo"),
        ):
            with pytest.raises(errors.NotFound, match=r"no alias named 'prdo' \(known aliases: canary, prod\)") as e:
                call()
            assert e.value.details["aliases"] == ["canary", "prod"]
        assert m.aliases() == {"prod": "llm@v1", "canary": "llm@v2"}
        assert [v.key for v in m.versions()] == ["llm@v1", "llm@v2"]
    finally:
        m.close()


def test_rollback_swaps_back_and_forth_and_the_hold_ends_on_time(tmp_path):
    # Long enough that no pause of this thread lets a hold end before the checks right after the
    # swap and the rollback; short enough that the wait for it to end stays quick.
    m = _manager(tmp_path, keep_previous_seconds=3.0)
    try:
        plan = swap(m, "prod", "llm@v2", keep_previous=True)
        plan.run()
        assert "kept llm@v1 resident" in plan.note
        v1 = m.get("llm", "v1")
        assert v1.retire and v1.previous_of == "prod" and v1.held_until_unix > 0

        mv, old, note = m.rollback("prod")
        assert (mv.key, old) == ("llm@v1", "llm@v2") and "kept llm@v2" in note
        assert m.aliases() == {"prod": "llm@v1"} and not v1.retire and not v1.previous_of
        v2 = m.get("llm", "v2")
        assert v2.previous_of == "prod"

        lease = m.open_lease("llm@v2")  # leased past its hold: it goes with the lease, not before
        wait_until(lambda: not v2.previous_of, 30, "the hold on llm@v2 to end")
        assert [v.key for v in m.versions()] == ["llm@v1", "llm@v2"]
        with pytest.raises(errors.FailedPrecondition, match="no previous version kept resident"):
            m.rollback("prod")
        m.close_lease(lease.id)
        assert [v.key for v in m.versions()] == ["llm@v1"]
    finally:
        m.close()


def test_keep_previous_off_retires_at_once_and_remove_alias_ends_a_hold(tmp_path):
    m = _manager(tmp_path, keep_previous=False)
    try:
        plan = swap(m, "prod", "llm@v2")
        plan.run()
        assert "retired llm@v1" in plan.note and "keep_previous is off" in plan.note
        assert [v.key for v in m.versions()] == ["llm@v2"]
    finally:
        m.close()
    m = _manager(tmp_path / "again")
    try:
        swap(m, "prod", "llm@v2", keep_previous=True).run()
        assert m.remove_alias("prod") == "llm@v2"
        assert [v.key for v in m.versions()] == ["llm@v2"]  # v1 was only kept for prod's rollback
    finally:
        m.close()


@pytest.mark.parametrize("comes_back", [True, False], ids=["holder-relets", "nobody-comes-back"])
def test_a_version_retired_while_leased_is_restored_retired_and_freed(tmp_path, comes_back):
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    m1 = _manager(tmp_path)
    received: dict[str, list[int]] = {}
    try:
        m1.open_lease("prod")
        swap(m1, "prod", "llm@v2", keep_previous=False).run()
        assert m1.get("llm", "v1").retire
        p1 = Persister(m1, state, sock, fdstore=True)
        received.update(hand_over_fds(m1, p1, ("llm@v1", "llm@v2")))
        p1.save()
    finally:
        m1.close()  # the old daemon is gone; the fds above keep the memory

    m2 = ModelManager(CpuBackend(memory_limit=256 * MiB), relet_grace=0.5)
    try:
        report = restore(m2, m2.backend, Persister(m2, state, sock, fdstore=True), received)
        assert sorted(report.restored) == ["llm@v1", "llm@v2"], report.note
        v1 = m2.get("llm", "v1")
        assert v1.retire and m2.aliases() == {"prod": "llm@v2"}
        if comes_back:
            lease = m2.open_lease("llm@v1")  # the holder's client leases its version again
            wait_until(lambda: v1.relet_until == 0, what="the relet to end the wait")
            assert [v.key for v in m2.versions()] == ["llm@v1", "llm@v2"]
            m2.close_lease(lease.id)
            assert [v.key for v in m2.versions()] == ["llm@v2"]
        else:
            wait_until(lambda: [v.key for v in m2.versions()] == ["llm@v2"], what="llm@v1 to go after the grace")
        assert v1.freed
    finally:
        m2.close()
        for fds in received.values():
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


def test_a_drain_swap_frees_the_version_kept_for_a_rollback_first(tmp_path):
    from hotweightsd.core.swap import SwapMode

    m = _manager(tmp_path, keep_previous_seconds=600)
    try:
        swap(m, "prod", "llm@v2", keep_previous=True).run()
        assert m.get("llm", "v1").previous_of == "prod"
        plan = swap(m, "prod", str(versioned_model(tmp_path, 3)), version="v3", mode=SwapMode.DRAIN)
        plan.run()
        assert "llm@v1, kept for a rollback" in plan.note, plan.note
        assert [v.key for v in m.versions()] == ["llm@v3"]  # v2 drained, v1 not left holding memory
        with pytest.raises(errors.HotweightsError):
            m.rollback("prod")  # nothing kept to go back to, rather than a jump two versions back
    finally:
        m.close()
