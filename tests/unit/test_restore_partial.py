"""A restart from the fd store where one version's state-file entry does not describe its fds: that
version alone is dropped (its fds closed and taken out of the store) and read from storage again; every
other version is served from the fds as before (in-process, a real memfd backend)."""

from __future__ import annotations

import os
from pathlib import Path

from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.manager import ModelManager
from hotweightsd.persist import statefile
from hotweightsd.persist.fdstore import Persister
from hotweightsd.persist.restore import restore
from support.ckpt_tools import write_model
from support.svcmgr import hand_over_fds

MiB = 2**20


def test_one_version_whose_entry_does_not_describe_its_fds_is_reloaded_and_the_others_restored(tmp_path: Path):
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    good_path = str(write_model(tmp_path / "good.safetensors", seed=1))
    bad_path = str(write_model(tmp_path / "bad.safetensors", seed=2))
    m1 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m1.load("good", good_path, version="v1", alias="prod")
        m1.load("bad", bad_path, version="v1", alias="canary")
        p1 = Persister(m1, state, sock, fdstore=True)
        received = hand_over_fds(m1, p1, ("good@v1", "bad@v1"))
        statefile.save(state, p1.snapshot())
    finally:
        m1.close()
    doc = statefile.load(state)
    [bad] = [v for v in doc["versions"] if v["name"] == "bad"]
    bad["ranks"][0]["placements"][0][5] = bad["ranks"][0]["allocation_sizes"][0]  # an offset past its allocation
    statefile.save(state, doc)  # a consistent file (checksummed) whose entry is wrong
    bad_fds = [fd for n, fds in received.items() if n.startswith("hw/bad@") for fd in fds]
    assert bad_fds

    m2 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        persister = Persister(m2, state, sock, fdstore=True)
        report = restore(m2, m2.backend, persister, received)
        assert report.restored == ["good@v1"], report.note
        assert m2.aliases() == {"prod": "good@v1"}
        assert [(r["name"], r["path"], r["aliases"]) for r in report.to_reload] == [("bad", bad_path, ["canary"])]
        assert "bad@v1" in report.note and "lies outside its allocation" in report.note
        for fd in bad_fds:  # closed, not served and not leaked
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} of the dropped version is still open")
        # until its reload settles, the state file still holds the dropped version and its alias
        saved = persister.snapshot()
        assert {f"{v['name']}@{v['version']}" for v in saved["versions"]} == {"good@v1", "bad@v1"}
        assert saved["aliases"] == {"prod": "good@v1", "canary": "bad@v1"}
    finally:
        m2.close()


def test_fds_that_are_not_the_ones_the_state_file_names_are_dropped_and_every_version_reloaded(tmp_path: Path):
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    path = str(write_model(tmp_path / "m.safetensors", seed=1))
    m1 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m1.load("m", path, version="v1", alias="prod")
        p1 = Persister(m1, state, sock, fdstore=True)
        received = hand_over_fds(m1, p1, ("m@v1",))
        statefile.save(state, p1.snapshot())
    finally:
        m1.close()
    stray = os.memfd_create("stray")
    received["hw/other@v9/0/0"] = [stray]  # an fd the state file does not name
    handed = [fd for fds in received.values() for fd in fds]
    m2 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        persister = Persister(m2, state, sock, fdstore=True)
        report = restore(m2, m2.backend, persister, received)
        assert report.restored == [] and m2.versions() == []
        assert [(r["name"], r["path"], r["aliases"]) for r in report.to_reload] == [("m", path, ["prod"])]
        assert "disagrees with the fds handed back" in report.note and "reloading 1 version(s)" in report.note
        for fd in handed:
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"handed-back fd {fd} is still open")
        saved = persister.snapshot()  # the state file keeps the version until its reload settles
        assert [f"{v['name']}@{v['version']}" for v in saved["versions"]] == ["m@v1"]
        assert saved["aliases"] == {"prod": "m@v1"}
    finally:
        m2.close()


def test_a_version_refused_at_its_second_rank_gives_back_what_its_first_rank_adopted(tmp_path: Path):
    sock = str(tmp_path / "hw.sock")
    state = tmp_path / "hw.sock.state.json"
    ckpt = tmp_path / "tp2"
    write_model(ckpt / "model-rank-0-part-0.safetensors", seed=1)
    write_model(ckpt / "model-rank-1-part-0.safetensors", seed=2)
    m1 = ModelManager(CpuBackend(memory_limit=256 * MiB))
    try:
        m1.load("m", str(ckpt), version="v1", alias="prod")
        p1 = Persister(m1, state, sock, fdstore=True)
        received = hand_over_fds(m1, p1, ("m@v1",))
        statefile.save(state, p1.snapshot())
    finally:
        m1.close()
    doc = statefile.load(state)
    [v] = doc["versions"]
    v["ranks"][1]["placements"][0][5] = v["ranks"][1]["allocation_sizes"][0]  # rank 1 wrong, rank 0 right
    statefile.save(state, doc)
    handed = [fd for fds in received.values() for fd in fds]
    backend = CpuBackend(memory_limit=256 * MiB)
    m2 = ModelManager(backend)
    try:
        report = restore(m2, backend, Persister(m2, state, sock, fdstore=True), received)
        assert report.restored == [] and [r["name"] for r in report.to_reload] == ["m"], report.note
        open_fds = []
        for fd in handed:
            try:
                os.fstat(fd)
            except OSError:
                continue
            open_fds.append(fd)
        assert open_fds == [], "rank 0's adopted fd outlived its refused version"
        assert m2.resident_bytes() == 0
        assert backend.devices()[0].free == CpuBackend(memory_limit=256 * MiB).devices()[0].free
    finally:
        m2.close()
