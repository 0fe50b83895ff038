"""Thousands of Watch streams opened at once, from one client process: every one is served, and every
one receives an alias move.

gRPC core holds the calls that grpc.aio's server loop has not yet taken; past its default of 1,000
it ends new ones at random with CANCELLED, as a trailers-only answer that also ends the client's
``initial_metadata()``. The daemon raises that limit (``grpc.server.max_pending_requests``,
docs/limits.md).
"""

from __future__ import annotations

import asyncio

import grpc

from hotweights.wire.pb import pb, pb_grpc
from support.ckpt_tools import write_model

STREAMS = 3_000
CHANNELS = 3
WAIT = 120.0  # a bound on a hung run, not a measurement


async def _watch_all(socket: str, operator_socket: str) -> tuple[dict[int, str], int, list[int]]:
    # one connection per channel, as separate client processes would have
    channels = [
        grpc.aio.insecure_channel(f"unix://{socket}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    ops = grpc.aio.insecure_channel(f"unix://{operator_socket}")
    ended: dict[int, str] = {}  # streams that ended before any event: index -> status
    subscribed = 0
    moved: set[int] = set()
    settled = asyncio.Event()  # every stream subscribed or ended
    all_moved = asyncio.Event()

    async def watch(i: int) -> None:
        nonlocal subscribed
        call = pb_grpc.HotweightsStub(channels[i % CHANNELS]).Watch(pb.WatchRequest(ref=""))
        try:
            await call.initial_metadata()
            if call.done():  # a status without a subscription also ends initial_metadata()
                ended[i] = (await call.code()).name
            else:
                subscribed += 1
            if subscribed + len(ended) == STREAMS:
                settled.set()
            async for ev in call:
                if ev.kind == pb.WatchEvent.ALIAS_MOVED and ev.alias == "many":
                    moved.add(i)
                    if len(moved) == STREAMS:
                        all_moved.set()
        except grpc.aio.AioRpcError as exc:
            ended.setdefault(i, exc.code().name)
            if subscribed + len(ended) == STREAMS:
                settled.set()

    tasks = [asyncio.ensure_future(watch(i)) for i in range(STREAMS)]
    try:
        await asyncio.wait_for(settled.wait(), WAIT)
        if not ended:
            await pb_grpc.HotweightsStub(ops).SetAlias(pb.SetAliasRequest(alias="many", target="m@v1", create=True))
            await asyncio.wait_for(all_moved.wait(), WAIT)
        return ended, subscribed, sorted(set(range(STREAMS)) - moved)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in [*channels, ops]:
            await ch.close()


def test_every_watcher_of_a_burst_is_served_and_gets_the_alias_move(daemon, tmp_path):
    daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
    ended, subscribed, missed = asyncio.run(_watch_all(daemon.socket, daemon.operator_socket))
    assert not ended, f"{len(ended)} of {STREAMS} streams ended unsubscribed: {sorted(set(ended.values()))}"
    assert subscribed == STREAMS
    assert not missed, f"{len(missed)} watchers never got the alias move"
    assert daemon.alive()
