"""Loading a name@version that is already loaded: the same content is returned as it is, other content is refused."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from hotweights import errors
from hotweightsd.backends.cpu import CpuBackend
from hotweightsd.core.content import ContentId
from hotweightsd.core.events import EventKind
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import State
from hotweightsd.core.swap import swap
from hotweightsd.persist.fdstore import _encode_version
from support.ckpt_tools import versioned_model, write_model


class CountingBackend(CpuBackend):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.allocations = 0
        self.fills = 0

    def allocate(self, *a, **k):
        self.allocations += 1
        return super().allocate(*a, **k)

    def fill(self, *a, **k):
        self.fills += 1
        return super().fill(*a, **k)


@pytest.fixture
def manager():
    m = ModelManager(CountingBackend(memory_limit=64 * 2**20))
    yield m
    m.close()


def test_same_content_again_returns_the_loaded_version_without_reading(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    first = manager.load("llm", path, version="v1")
    resident, allocs, fills = manager.resident_bytes(), manager.backend.allocations, manager.backend.fills

    again = manager.start_load("llm", path, version="v1")
    assert again.already_loaded and again.version is first
    assert again.run() is first
    assert manager.load("llm", path, version="v1") is first  # the plain entry point too
    assert [v.key for v in manager.versions()] == ["llm@v1"] and first.state is State.READY
    assert (manager.resident_bytes(), manager.backend.allocations, manager.backend.fills) == (resident, allocs, fills)


def test_first_load_is_not_marked_already_loaded(manager, tmp_path):
    start = manager.start_load("llm", str(versioned_model(tmp_path, 1)), version="v1")
    assert not start.already_loaded
    start.run()


def test_without_a_version_the_same_checkpoint_is_the_same_version(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    first = manager.load("llm", path)
    again = manager.start_load("llm", path)
    assert again.already_loaded and again.version is first
    assert len(manager.versions()) == 1


def test_other_file_same_version_is_a_content_mismatch(manager, tmp_path):
    manager.load("llm", str(versioned_model(tmp_path, 1)), version="v1")
    resident = manager.resident_bytes()
    other = versioned_model(tmp_path, 2)
    with pytest.raises(errors.ContentMismatch, match=r"llm@v1 is already loaded \(READY\) from .*v1") as exc:
        manager.load("llm", str(other), version="v1")
    assert isinstance(exc.value, errors.AlreadyExists)
    assert str(other) in str(exc.value) and "files only in the new checkpoint" in str(exc.value)
    assert exc.value.details["ref"] == "llm@v1" and exc.value.details["differences"]
    assert manager.resident_bytes() == resident and len(manager.versions()) == 1


def test_a_file_changed_in_place_is_a_content_mismatch(manager, tmp_path):
    path = versioned_model(tmp_path, 1)
    manager.load("llm", str(path), version="v1")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten: same header, same size
    with pytest.raises(errors.ContentMismatch, match="modified since it was loaded"):
        manager.load("llm", str(path), version="v1")


def test_other_sizes_and_headers_are_named(manager, tmp_path):
    path = tmp_path / "m.safetensors"
    write_model(path, {"w": torch.zeros(8)})
    manager.load("llm", str(path), version="v1")
    os.unlink(path)
    write_model(path, {"w": torch.zeros(16)})
    with pytest.raises(errors.ContentMismatch) as exc:
        manager.load("llm", str(path), version="v1")
    text = str(exc.value)
    assert "size" in text and "content digest" in text, text


def test_a_load_in_progress_is_joined(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    first = manager.start_load("llm", path, version="v1")
    again = manager.start_load("llm", path, version="v1", alias="prod")
    assert again.already_loaded and again.version is first.version and again.version.state is State.LOADING
    joined: list = []
    waiter = threading.Thread(target=lambda: joined.append(again.run()))
    waiter.start()
    first.run()
    waiter.join(timeout=30)
    assert joined == [first.version] and first.version.state is State.READY
    assert manager.aliases() == {"prod": "llm@v1"}  # the alias of the joining load, applied once READY
    assert manager.backend.fills == 1


def test_alias_is_applied_unless_it_points_there_already(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    manager.load("llm", path, version="v1", alias="prod")
    moves: list = []
    manager.events.subscribe(lambda ev: moves.append(ev) if ev.kind is EventKind.ALIAS_MOVED else None)
    manager.load("llm", path, version="v1", alias="prod")
    assert moves == []
    manager.load("llm", path, version="v1", alias="canary")
    assert [ev.alias for ev in moves] == ["canary"]
    assert manager.aliases() == {"prod": "llm@v1", "canary": "llm@v1"}


def test_a_retiring_version_is_not_reused(manager, tmp_path):
    v1 = str(versioned_model(tmp_path, 1))
    manager.load("llm", v1, version="v1", alias="prod")
    lease = manager.open_lease("prod")
    swap(manager, "prod", str(versioned_model(tmp_path, 2)), version="v2", keep_previous=False).run()
    assert manager.get("llm", "v1").retire
    with pytest.raises(errors.AlreadyExists, match="retiring") as exc:
        manager.load("llm", v1, version="v1")
    assert not isinstance(exc.value, errors.ContentMismatch)
    manager.close_lease(lease.id)


def test_a_version_kept_for_a_rollback_is_rejoined_by_the_same_content(manager, tmp_path):
    v1 = str(versioned_model(tmp_path, 1))
    manager.load("llm", v1, version="v1", alias="prod")
    swap(manager, "prod", str(versioned_model(tmp_path, 2)), version="v2", keep_previous=True).run()
    kept = manager.get("llm", "v1")
    assert kept.previous_of == "prod"
    start = manager.start_load("llm", v1, version="v1", alias="prod")
    assert start.already_loaded and start.version is kept
    start.run()
    assert manager.aliases() == {"prod": "llm@v1"} and not kept.retire and not kept.previous_of


def test_loading_a_kept_version_again_without_an_alias_keeps_it(manager, tmp_path):
    v1 = str(versioned_model(tmp_path, 1))
    manager.load("llm", v1, version="v1", alias="prod")
    swap(manager, "prod", str(versioned_model(tmp_path, 2)), version="v2", keep_previous=True).run()
    kept = manager.get("llm", "v1")
    start = manager.start_load("llm", v1, version="v1")  # asked for by name, no alias
    assert start.already_loaded
    start.run()
    assert not kept.retire and not kept.previous_of and not kept.hold_until
    manager._recheck(kept)  # what the hold's timer would do when the grace ends
    assert manager.get("llm", "v1") is kept  # "already loaded" stays true: nothing frees it


def test_a_version_without_a_content_record_is_not_assumed_the_same(manager, tmp_path):
    path = str(versioned_model(tmp_path, 1))
    mv = manager.load("llm", path, version="v1")
    assert mv.content is not None
    mv.content = ContentId.from_json(None)  # restored from a state file written before content was recorded
    with pytest.raises(errors.ContentMismatch, match="no record of its files"):
        manager.load("llm", path, version="v1")


def test_the_state_file_keeps_the_content_record(manager, tmp_path):
    """A daemon restored from the fd store still knows what its versions were read from."""
    mv = manager.load("llm", str(versioned_model(tmp_path, 1)), version="v1")
    doc = json.loads(json.dumps(_encode_version(mv, [["hw/llm@v1/0/0"]])))
    assert mv.content is not None and ContentId.from_json(doc["content"]) == mv.content
    assert [f.path for f in mv.content.files] == [str((tmp_path / "v1" / "model.safetensors").resolve())]
