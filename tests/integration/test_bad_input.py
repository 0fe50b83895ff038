"""Each bad input gets a clear error naming the problem; the daemon stays
up and holds nothing afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hotweights.testing import WAIT_TIMEOUT
from support.ckpt_tools import raw_file, write_model
from support.daemons import run_cli, run_client, start_daemon, wait_until

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _missing(d: Path) -> Path:
    return d / "nope"


def _empty_dir(d: Path) -> Path:
    (d / "empty").mkdir()
    (d / "empty" / "README").write_text("no weights here")
    return d / "empty"


def _truncated(d: Path) -> Path:
    p = write_model(d / "t.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    return p


def _header_too_long(d: Path) -> Path:
    return raw_file(d / "h.safetensors", {"a": F32x2}, b"\0" * 8, header_len=10_000)


def _not_json(d: Path) -> Path:
    return raw_file(d / "j.safetensors", b"{this is not json", b"")


def _outside(d: Path) -> Path:
    return raw_file(d / "o.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)


def _overlap(d: Path) -> Path:
    return raw_file(
        d / "v.safetensors",
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    )


def _unknown_dtype(d: Path) -> Path:
    return raw_file(d / "u.safetensors", {"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def _size_mismatch(d: Path) -> Path:
    return raw_file(d / "s.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12)


def _duplicates(d: Path) -> Path:
    raw_file(d / "dup" / "a.safetensors", {"w": F32x2}, b"\0" * 8)
    raw_file(d / "dup" / "b.safetensors", {"w": F32x2}, b"\0" * 8)
    return d / "dup"


def _index_missing(d: Path) -> Path:
    raw_file(d / "idx" / "model-00001.safetensors", {"a": F32x2}, b"\0" * 8)
    (d / "idx" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}})
    )
    return d / "idx"


def _index_nested_deeply(d: Path) -> Path:
    raw_file(d / "deep" / "model-00001.safetensors", {"a": F32x2}, b"\0" * 8)
    (d / "deep" / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    return d / "deep"


def _header_nested_deeply(d: Path) -> Path:
    return raw_file(d / "n.safetensors", b"[" * 100_000 + b"]" * 100_000, b"")


CASES = [
    (_missing, "no such file or directory"),
    (_empty_dir, "no .safetensors files"),
    (_truncated, "truncated"),
    (_header_too_long, "runs past the end"),
    (_not_json, "not valid JSON"),
    (_outside, "end past the 8-byte data section"),
    (_overlap, "overlap"),
    (_unknown_dtype, "unknown dtype 'F17'"),
    (_size_mismatch, "needs 16 bytes but data_offsets span 12"),
    (_duplicates, "duplicate tensor 'w' in a.safetensors and b.safetensors"),
    (_index_missing, "names model-00002.safetensors, which does not exist"),
    (_index_nested_deeply, "not a valid index"),
    (_header_nested_deeply, "nested too deeply"),
]


@pytest.mark.parametrize("make,expected", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_checkpoint_is_refused_clearly_and_leaks_nothing(daemon, tmp_path, make, expected):
    fds_before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    path = make(tmp_path)
    r = daemon.cli("load", "bad", str(path))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hotweights: "), r.stderr
    assert expected in lines[0], lines[0]
    assert daemon.alive()
    st = daemon.status()
    assert st["resident_bytes"] == 0 and st["open_allocations"] == 0
    assert daemon.memfds() == []
    assert len(os.listdir(f"/proc/{daemon.pid}/fd")) <= fds_before
    # and the daemon still loads a good checkpoint afterwards
    good = write_model(tmp_path / "good" / "g.safetensors")
    daemon.cli("load", "good", str(good), check=True)


def test_attach_of_unknown_model_is_not_found(daemon):
    r = run_client("attach_unknown", daemon.socket)
    assert "NotFound: no model, version or alias named 'ghost' is loaded" in r.stdout


def test_reused_ticket_is_refused(daemon, tmp_path):
    daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
    r = run_client("ticket", daemon.socket, "reuse")
    assert "first ok 1" in r.stdout
    assert "TicketInvalid: ticket is unknown, already used or expired" in r.stdout
    assert "forged refused" in r.stdout
    assert daemon.alive()


def test_expired_ticket_is_refused(sockdir, tmp_path):
    d = start_daemon(str(sockdir / "ttl.sock"), extra_env={"HOTWEIGHTS_TICKET_TTL": "0.3"})
    try:
        d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), check=True)
        r = run_client("ticket", d.socket, "expire", "0.6")
        assert "TicketInvalid" in r.stdout and "second ok" not in r.stdout
        wait_until(lambda: d.leases() == [], what="the client's released lease to end")
    finally:
        assert d.stop() == 0


def test_load_that_does_not_fit_is_refused_before_reading(sockdir, tmp_path):
    # every allocation and every read fails on purpose: a refusal that says "does not fit" came first
    never = "load.allocate:times=1000000,load.read:times=1000000"
    d = start_daemon(str(sockdir / "small.sock"), "--memory-limit", "1MB", "--faults", never)
    try:
        assert "faults.planned" in d.logs(), d.logs()
        ckpt = write_model(tmp_path / "m.safetensors")
        r = d.cli("load", "m", str(ckpt))
        assert r.returncode == 1
        assert "does not fit on host memory: needs" in r.stderr and "free" in r.stderr, r.stderr
        assert "injected fault" not in r.stderr + d.logs(), r.stderr
        assert d.memfds() == [] and d.status()["versions"] == []
    finally:
        assert d.stop() == 0


def test_cli_without_daemon_says_so(sockdir):
    r = run_cli("list", "--socket", str(sockdir / "none.sock"))
    assert r.returncode == 1
    assert "unreachable" in r.stderr or "no hotweights daemon" in r.stderr, r.stderr


def test_huge_client_strings_come_back_as_a_short_prefix(daemon):
    """A name of 70,000 characters is refused with a typed error that quotes its first 200 and its
    length; echoing it whole would overflow gRPC's metadata limit and lose the status."""
    import hotweights

    huge = "x" * 70_000
    with daemon.connect() as c:
        for call in (
            lambda: c.unload(huge),
            lambda: c.set_alias(huge, "m@v1"),
            lambda: c.rollback(huge),
            lambda: c.swap(huge, "m@v1"),
            lambda: c.load(huge, "/nonexistent.safetensors"),
            lambda: c.load("m", "/" + huge),
        ):
            with pytest.raises((hotweights.errors.InvalidArgument, hotweights.errors.NotFound)) as info:
                call()
            msg = str(info.value)
            assert "x" * 199 + "…(7000" in msg and "x" * 201 not in msg, msg[:400]
            assert len(msg) < 1000, msg[:400]
    assert daemon.alive()


def test_unknown_enum_numbers_are_invalid_arguments(daemon, tmp_path):
    import grpc

    from hotweights.wire.pb import pb, pb_grpc
    from hotweights.wire.status import CLASS_KEY

    good = str(write_model(tmp_path / "m.safetensors"))
    requests = [
        ("LoadModel", pb.LoadModelRequest(name="m", path=good, allocation=3), "allocation: unknown enum number 3"),
        ("LoadModel", pb.LoadModelRequest(name="m", path=good, verify=-1), "verify: unknown enum number -1"),
        ("SwapModel", pb.SwapModelRequest(alias="a", target="m@v1", mode=9), "mode: unknown enum number 9"),
        ("SwapModel", pb.SwapModelRequest(alias="a", target=good, verify=4), "verify: unknown enum number 4"),
        ("SwapModel", pb.SwapModelRequest(alias="a", target="m@v1", keep_previous=9), "keep_previous: unknown enum"),
    ]
    with grpc.insecure_channel(f"unix://{daemon.socket}.admin") as channel:  # loads are an operator's
        stub = pb_grpc.HotweightsStub(channel)
        for rpc, request, expected in requests:
            with pytest.raises(grpc.RpcError) as info:
                list(getattr(stub, rpc)(request, timeout=30))
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, err.code(), err.details())
            assert expected in err.details(), err.details()
            assert dict(err.trailing_metadata())[CLASS_KEY] == "InvalidArgument"
    assert daemon.status()["versions"] == []


def test_a_64_mib_field_is_refused_typed_and_the_daemon_stays_healthy(daemon):
    """gRPC refuses a request over the daemon's 1 MiB limit before Python reads it (docs/limits.md)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import hotweights

    huge = "x" * (64 * 2**20)
    with daemon.connect() as c:
        for call in (lambda: c.load("m", "/" + huge), lambda: c.set_alias(huge, "m@v1")):
            with pytest.raises(hotweights.errors.ResourceExhausted) as info:
                call()
            assert len(str(info.value)) < 1000, str(info.value)[:400]
    assert daemon.alive()
    with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert daemon.status()["versions"] == []


def test_a_slow_watcher_is_dropped_while_a_fast_one_keeps_receiving(sockdir, tmp_path):
    """A watcher whose process stopped reading (its transport takes no more bytes) is dropped once
    8 events wait for it, with a typed status; the watcher that reads gets every event, in order."""
    import threading

    import grpc

    import hotweights
    from hotweights.wire.pb import pb, pb_grpc

    d = start_daemon(str(sockdir / "watch.sock"), "--watch-queue", "8")
    # a small stream window that never grows: the transport stops taking bytes once 1 KiB is unread
    slow_options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    slow_channel = grpc.insecure_channel(f"unix://{d.socket}", options=slow_options)
    try:
        d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
        slow = pb_grpc.HotweightsStub(slow_channel).Watch(pb.WatchRequest(ref=""))
        seen: list[pb.WatchEvent] = []
        changed = threading.Condition()
        with hotweights.connect(d.socket) as c:
            fast = c.watch("")

            def read_fast() -> None:
                for ev in fast:
                    with changed:
                        seen.append(ev)
                        changed.notify_all()

            reader = threading.Thread(target=read_fast, daemon=True)
            reader.start()
            moves = 0
            while "watch.dropped" not in d.logs():
                assert moves < 5000, "the slow watcher was never dropped"
                c.set_alias("a", "m@v1", create=True)
                moves += 1
            c.remove_alias("a")
            with changed:
                assert changed.wait_for(lambda: any(ev.kind == pb.WatchEvent.ALIAS_REMOVED for ev in seen), 60)
            seqs = [ev.seq for ev in seen]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the fast watcher missed events"
            assert len(seen) >= moves // 2 and seen[-1].kind == pb.WatchEvent.ALIAS_REMOVED
            fast.cancel()
        with pytest.raises(grpc.RpcError) as info:
            for _ in slow:
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fell 8 events behind and was dropped" in info.value.details()
        assert d.alive() and d.status()["aliases"] == []
    finally:
        slow_channel.close()
        assert d.stop() == 0
