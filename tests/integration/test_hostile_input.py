"""Input a clumsy or hostile local client sends the daemon through its sockets: refused with a typed
error naming the problem, and the daemon keeps serving everyone else."""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from hotweights import errors
from hotweights.wire.pb import pb
from support.ckpt_tools import raw_file, versioned_model, write_model
from support.daemons import run_client, start_daemon

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_names_ending_in_a_newline_are_refused(client, tmp_path):
    path = write_model(tmp_path / "m.safetensors")
    with pytest.raises(errors.InvalidArgument, match="invalid model name"):
        client.load("odd\n", path, version="v1")
    with pytest.raises(errors.InvalidArgument, match="invalid version"):
        client.load("m", path, version="v1\n")
    client.load("m", path, version="v1")
    with pytest.raises(errors.InvalidArgument, match="invalid alias"):
        client.set_alias("prod\n", "m@v1", create=True)
    assert [(v.name, v.version) for v in client.list().versions] == [("m", "v1")]


def test_a_tensor_name_that_is_not_unicode_is_a_bad_checkpoint(client, tmp_path):
    p = raw_file(tmp_path / "s.safetensors", b'{"\\ud800": ' + str(F32x2).replace("'", '"').encode() + b"}", b"\0" * 8)
    with pytest.raises(errors.BadCheckpoint, match="is not valid Unicode text"):
        client.load("m", p, version="v1")
    assert list(client.list().versions) == []


def _lease_stream(client, ref: str, pid: int, holder: str, done: threading.Event):
    def requests():
        yield pb.LeaseRequest(open=pb.LeaseOpen(ref=ref, pid=pid, holder=holder))
        done.wait(60)
        yield pb.LeaseRequest(release=pb.LeaseRelease())

    return client.stub.Lease(requests())


def test_a_holder_is_bounded_and_printable(client, daemon, tmp_path):
    client.load("m", write_model(tmp_path / "m.safetensors"), version="v1")
    done = threading.Event()
    try:
        for holder, why in (("h" * 257, "257 characters long; at most 256"), ("a\nb", "not printable")):
            with pytest.raises(grpc.RpcError) as refused:
                next(_lease_stream(client, "m@v1", os.getpid(), holder, done))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert why in refused.value.details()
        ok = _lease_stream(client, "m@v1", os.getpid(), "h" * 256, done)
        assert next(ok).granted.version == "v1"
        assert [le.holder for le in client.status().leases] == ["h" * 256]
    finally:
        done.set()
    daemon.wait_status(lambda s: s["leases"] == [])


def test_leases_are_capped_per_process_and_others_still_get_theirs(sockdir, tmp_path):
    import hotweights

    with start_daemon(str(sockdir / "hw.sock"), "--max-leases-per-pid", "3") as d:
        c = hotweights.connect(d.socket)
        c.load("m", versioned_model(tmp_path, 1), version="v1")
        done = threading.Event()
        try:
            greedy = [_lease_stream(c, "m@v1", 4242, "greedy", done) for _ in range(3)]
            assert all(next(s).granted.version == "v1" for s in greedy)
            with pytest.raises(grpc.RpcError) as refused:
                next(_lease_stream(c, "m@v1", 4242, "greedy", done))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "pid 4242 holds 3 leases" in refused.value.details()
            # another process still leases, and attaches through the fd socket
            assert run_client("attach_version", d.socket, "m@v1").stdout.split() == ["v1", "1"]
        finally:
            done.set()
        d.wait_status(lambda s: s["leases"] == [])
        # the greedy process's leases ended: it may lease again
        again = threading.Event()
        assert next(_lease_stream(c, "m@v1", 4242, "greedy", again)).granted.version == "v1"
        again.set()
        d.wait_status(lambda s: s["leases"] == [])
        c.close()
