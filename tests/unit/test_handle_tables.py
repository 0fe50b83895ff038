"""The cache of encoded GetHandles answers: built once per rank, never served for another version
object under the same key, dropped when its version goes."""

from __future__ import annotations

from hotweights.wire.pb import pb
from hotweightsd.core.events import Event, EventKind
from hotweightsd.server.tables import TableCache


class _Rank:  # stands in for a ResidentRank: the cache tells them apart by identity only
    pass


def _builder(built: list[int]):
    def build() -> pb.GetHandlesResponse:
        built.append(1)
        return pb.GetHandlesResponse(rank=len(built))

    return build


def test_a_table_is_built_once_per_rank_and_again_for_a_version_loaded_later_under_the_same_key():
    cache, built = TableCache(), []
    first = _Rank()
    a = cache.get(("m@v1", 0, False), first, _builder(built))
    assert cache.get(("m@v1", 0, False), first, _builder(built)) is a and len(built) == 1
    assert cache.get(("m@v1", 0, True), first, _builder(built)) is not a and len(built) == 2  # compact: its own
    b = cache.get(("m@v1", 0, False), _Rank(), _builder(built))  # reloaded after a forced unload
    assert b is not a and len(built) == 3
    assert cache.encoding() == 0


def test_a_freed_or_failed_version_drops_its_tables_and_nothing_else():
    cache, built = TableCache(), []
    r1, r2 = _Rank(), _Rank()
    cache.get(("m@v1", 0, False), r1, _builder(built))
    cache.get(("n@v1", 0, False), r2, _builder(built))
    cache.forget(Event(EventKind.ALIAS_MOVED, "m", version="v1"))
    cache.get(("m@v1", 0, False), r1, _builder(built))
    assert len(built) == 2
    cache.forget(Event(EventKind.VERSION_FREED, "m", version="v1"))
    cache.get(("m@v1", 0, False), r1, _builder(built))
    cache.get(("n@v1", 0, False), r2, _builder(built))
    assert len(built) == 3
    cache.forget(Event(EventKind.VERSION_FAILED, "n", version="v1"))
    cache.get(("n@v1", 0, False), r2, _builder(built))
    assert len(built) == 4


def test_a_build_that_fails_leaves_no_encoder_behind_and_the_next_caller_builds():
    cache, built = TableCache(), []
    rank = _Rank()

    def broken() -> pb.GetHandlesResponse:
        raise RuntimeError("encoding failed")

    try:
        cache.get(("m@v1", 0, False), rank, broken)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the build's error must reach the caller")
    assert cache.encoding() == 0
    cache.get(("m@v1", 0, False), rank, _builder(built))
    assert len(built) == 1
