"""Limits on what a request or a header can make the daemon build: tensor counts, placement, watchers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from hotweights import errors
from hotweights.format import safetensors
from hotweights.format.checkpoint import HeaderLimits, RankFiles, open_checkpoint
from hotweights.format.dtypes import lookup
from hotweights.format.safetensors import MAX_TENSORS_PER_FILE, FileHeader, TensorEntry, parse_header
from hotweightsd.config import load_config
from hotweightsd.core.events import EventBus, EventKind
from hotweightsd.core.layout import ALIGN, SMALL_ALIGN, plan_rank
from hotweightsd.server.watchers import EventHub, Overflow
from support.ckpt_tools import raw_file


def _rank(sizes: list[tuple[str, int]]) -> RankFiles:
    """One file holding tensors of the given (dtype, element count), back to back."""
    tensors, cursor = [], 8
    for i, (dtype, n) in enumerate(sizes):
        dt = lookup(dtype)
        nbytes = n * dt.bits // 8
        tensors.append(TensorEntry(f"t{i}", dt, (n,), cursor, cursor + nbytes))
        cursor += nbytes
    return RankFiles(0, [FileHeader(Path("x.safetensors"), cursor, 8, tensors)])


# ---- placement ------------------------------------------------------------------------------------


def test_tiny_tensors_are_packed_at_16_bytes_and_large_ones_keep_256():
    rank = _rank([("F32", 3), ("U8", 1), ("F32", 64), ("BF16", 5), ("F64", 1), ("F16", 300), ("I64", 2)])
    layout = plan_rank(rank, granularity=1)
    by_name = {p.name: p for p in layout.placements}
    for p in layout.placements:
        assert p.offset % (ALIGN if p.nbytes >= ALIGN else SMALL_ALIGN) == 0, p
        assert p.offset % (lookup(p.dtype).bits // 8) == 0, p  # the client's typed views need no copy
    assert by_name["t1"].offset == 16  # right after the 12 bytes of t0, not at 256
    assert by_name["t2"].offset == 256  # 256 bytes of F32: a kernel's operand keeps 256
    assert by_name["t5"].offset % 256 == 0
    ordered = sorted(layout.placements, key=lambda p: p.offset)
    assert all(a.offset + a.nbytes <= b.offset for a, b in zip(ordered, ordered[1:]))


def test_a_rank_of_tiny_tensors_reserves_16_bytes_each_not_256():
    n = 10_000
    layout = plan_rank(_rank([("U8", 1)] * n), granularity=1)
    assert layout.reserved_bytes <= SMALL_ALIGN * n
    assert layout.nbytes == n


# ---- tensor counts and the time budget -------------------------------------------------------------


def _many(n: int) -> bytes:
    return (
        b"{"
        + b",".join(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(n))
        + b"}"
    )


def test_too_many_tensors_are_refused_before_the_json_is_parsed(monkeypatch):
    raw = _many(MAX_TENSORS_PER_FILE + 1)

    def no_parse(*a, **kw):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(safetensors.json, "loads", no_parse)
    with pytest.raises(errors.BadCheckpoint, match=f"lists {MAX_TENSORS_PER_FILE + 1} tensors; the limit is"):
        parse_header(Path("many.safetensors"), 8 + len(raw) + MAX_TENSORS_PER_FILE + 1, raw)


def test_an_entry_token_inside_a_name_is_not_counted():
    doc = {'a"data_offsets"': {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    raw = json.dumps(doc).encode()
    assert [t.name for t in parse_header(Path("x"), 8 + len(raw) + 1, raw, max_tensors=1).tensors] == [
        'a"data_offsets"'
    ]


def test_a_header_that_outlasts_its_time_budget_is_refused():
    n = 3 * 4096
    raw = _many(n)
    with pytest.raises(errors.BadCheckpoint, match="ran out of its time budget after 4096 of"):
        parse_header(Path("slow.safetensors"), 8 + len(raw) + n, raw, deadline=time.monotonic() - 1)


def test_tensors_per_rank_are_counted_across_its_files(tmp_path):
    d = tmp_path / "sharded"
    for r in range(2):
        for part in range(2):
            raw_file(
                d / f"model-rank-{r}-part-{part}.safetensors",
                {f"r{r}p{part}t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(3)},
                b"\0" * 3,
            )
    assert open_checkpoint(d, limits=HeaderLimits(max_tensors_per_rank=6)).world_size == 2
    with pytest.raises(
        errors.BadCheckpoint, match="rank 0 lists 6 tensors in its files up to this one; the limit is 5"
    ):
        open_checkpoint(d, limits=HeaderLimits(max_tensors_per_rank=5))
    with pytest.raises(errors.BadCheckpoint, match="the limit is 2 per file"):
        open_checkpoint(d, limits=HeaderLimits(max_tensors_per_file=2))
    with pytest.raises(errors.BadCheckpoint, match="ran out of its 0s budget"):
        open_checkpoint(d, limits=HeaderLimits(budget_seconds=0))


def test_tensor_limits_are_configuration_keys():
    cfg = load_config(env={"HOTWEIGHTS_CONFIG": "none"})
    assert (cfg.max_tensors_per_file, cfg.max_tensors_per_rank) == (MAX_TENSORS_PER_FILE, 1_000_000)
    cfg = load_config(env={"HOTWEIGHTS_CONFIG": "none", "HOTWEIGHTS_MAX_TENSORS_PER_RANK": "5000"})
    assert cfg.header_limits().max_tensors_per_rank == 5000
    with pytest.raises(errors.InvalidArgument, match="max_tensors_per_file"):
        load_config(overrides={"max_tensors_per_file": 0}, env={"HOTWEIGHTS_CONFIG": "none"})


# ---- watcher fan-out ------------------------------------------------------------------------------


def test_a_slow_watcher_is_dropped_and_a_fast_one_keeps_every_event():
    """The publisher only hands events over; the watcher that stops reading is dropped once 8 events
    are unread, the one that reads gets them all, in order."""

    async def main() -> None:
        bus = EventBus()
        hub = EventHub(bus, dict, depth=8)
        fast = hub.subscribe(lambda ev, _: True)
        slow = hub.subscribe(lambda ev, _: True)
        seen: list[int] = []
        got = asyncio.Condition()

        async def read_fast() -> None:
            while True:
                ev = await fast.get()
                async with got:
                    seen.append(ev.seq)
                    got.notify_all()

        reader = asyncio.ensure_future(read_fast())
        for batch in range(4):  # 4 x 5 events: the fast reader keeps up, the slow one passes 8 unread
            publisher = threading.Thread(
                target=lambda: [bus.publish(EventKind.ALIAS_MOVED, "m", alias="a") for _ in range(5)]
            )
            publisher.start()
            await asyncio.to_thread(publisher.join)
            async with got:
                await asyncio.wait_for(got.wait_for(lambda: len(seen) == 5 * (batch + 1)), 10)
        assert seen == list(range(1, 21))
        assert slow.dropped and hub.dropped == 1 and len(hub) == 1
        with pytest.raises(errors.ResourceExhausted, match="fell 8 events behind and was dropped"):
            await slow.get()
        reader.cancel()
        hub.close()

    asyncio.run(main())


def test_a_lease_stream_keeps_the_newest_alias_moves():
    async def main() -> None:
        bus = EventBus()
        hub = EventHub(bus, dict, depth=2)
        sub = hub.subscribe(lambda ev, _: True, overflow=Overflow.DROP_OLDEST)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        bus.subscribe(lambda ev: ev.seq == 5 and loop.call_soon_threadsafe(done.set))
        await asyncio.to_thread(lambda: [bus.publish(EventKind.ALIAS_MOVED, "m", alias="a") for _ in range(5)])
        await asyncio.wait_for(done.wait(), 10)  # the hub (subscribed first) handed event 5 over before this
        assert [(await sub.get()).seq for _ in range(2)] == [4, 5]
        assert not sub.dropped
        hub.close()

    asyncio.run(main())


def test_alias_snapshots_are_taken_only_for_alias_watchers():
    calls = []

    async def main() -> None:
        bus = EventBus()
        hub = EventHub(bus, lambda: calls.append(1) or {"prod": "m@v1"})
        everything = hub.subscribe(lambda ev, _: True)
        await asyncio.to_thread(bus.publish, EventKind.VERSION_READY, "m", version="v1")
        await asyncio.wait_for(everything.get(), 10)
        assert calls == []
        prod = hub.subscribe(
            lambda ev, aliases: ev.name == aliases.get("prod", "").partition("@")[0], needs_aliases=True
        )
        await asyncio.to_thread(bus.publish, EventKind.VERSION_READY, "m", version="v2")
        assert (await asyncio.wait_for(prod.get(), 10)).version == "v2"
        assert calls == [1]
        hub.unsubscribe(prod)
        hub.close()

    asyncio.run(main())


def test_events_reach_every_subscriber_in_order_a_chunk_per_turn_of_the_loop():
    """With 3 subscribers served per turn, 10 subscribers still get 4 events each, in order, and no
    turn gives an event to more than 3 of them."""

    async def main() -> None:
        bus = EventBus()
        hub = EventHub(bus, dict, chunk=3)
        subs = [hub.subscribe(lambda ev, _: True) for _ in range(10)]
        loop = asyncio.get_running_loop()
        turns: list[int] = []

        def count_turn() -> None:  # runs once per turn while events are being handed out
            turns.append(sum(s.queue.qsize() for s in subs))
            if sum(s.queue.qsize() for s in subs) < 40:
                loop.call_soon(count_turn)

        def publish() -> None:
            for _ in range(4):
                bus.publish(EventKind.ALIAS_MOVED, "m", alias="a")

        await asyncio.to_thread(publish)
        count_turn()
        for s in subs:
            assert [(await asyncio.wait_for(s.get(), 10)).seq for _ in range(4)] == [1, 2, 3, 4]
        assert all(b - a <= 3 for a, b in zip(turns, turns[1:])), turns
        hub.close()

    asyncio.run(main())
