"""How long a lease lives on the client side: as long as a module bound to it, and no longer than the
client it runs on. A real daemon (cpu backend) on a real socket; the client is this process."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from hotweights import errors
from hotweights.testing import WAIT_TIMEOUT
from support.ckpt_tools import mixed_tensors, write_model


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that ended a thread of this process while the test ran."""
    seen: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


def test_a_module_bound_to_an_attachment_holds_its_lease_as_long_as_it_lives(daemon, client, tmp_path):
    import hotweights.torch as hwt

    ckpt = write_model(tmp_path / "lin.safetensors", {"weight": torch.randn(4, 8), "bias": torch.randn(4)})
    client.load("lin", ckpt)
    with hwt.skeleton():
        model = torch.nn.Linear(8, 4)
    hwt.bind(model, client.attach("lin", holder="bound"))  # the caller keeps no reference to the attachment
    gc.collect()
    assert [le["holder"] for le in daemon.status()["leases"]] == ["bound"]
    r = daemon.cli("unload", "lin")
    assert r.returncode != 0 and "live lease" in r.stderr, r.stderr
    assert model(torch.ones(1, 8)).shape == (1, 4)
    del model
    gc.collect()
    assert daemon.wait_status(lambda st: not st["leases"])["leases"] == []


def test_closing_the_client_releases_its_attachments_and_no_thread_dies(daemon, tmp_path, thread_errors):
    import hotweights

    ckpt = write_model(tmp_path / "m.safetensors")
    daemon.cli("load", "m", str(ckpt), check=True)
    c = hotweights.connect(daemon.socket)
    att = c.attach("m", holder="closed-under")
    t = att["f32"]
    lease_thread = att._lease._thread
    c.close()
    lease_thread.join(WAIT_TIMEOUT)
    assert not lease_thread.is_alive(), "the lease thread never ended"
    assert att.released
    with pytest.raises(errors.FailedPrecondition):
        att["f32"]
    assert torch.equal(t, mixed_tensors()["f32"])  # tensors handed out stay readable, and still hold the data
    assert daemon.wait_status(lambda st: not st["leases"])["leases"] == []
    with pytest.raises(errors.FailedPrecondition, match="closed"):
        c.attach("m")
    assert thread_errors == []


def test_a_lease_whose_channel_closes_under_it_ends_without_a_crash(daemon, tmp_path, thread_errors):
    import hotweights

    ckpt = write_model(tmp_path / "m.safetensors")
    daemon.cli("load", "m", str(ckpt), check=True)
    c = hotweights.connect(daemon.socket)
    att = c.attach("m")
    lease_thread = att._lease._thread
    c.channel.close()  # not through close(): the lease thread finds the channel gone when it re-leases
    lease_thread.join(WAIT_TIMEOUT)
    assert not lease_thread.is_alive()
    assert att.released
    assert thread_errors == []
    assert daemon.wait_status(lambda st: not st["leases"])["leases"] == []
    att.release()


def test_binding_a_module_to_a_new_version_lets_go_of_the_old_ones_lease(daemon, client, tmp_path):
    import hotweights.torch as hwt

    for version, value in (("v1", 1.0), ("v2", 2.0)):
        ckpt = write_model(tmp_path / version / "lin.safetensors", {"weight": torch.full((4, 8), value)})
        client.load("lin", ckpt, version=version)
    with hwt.skeleton():
        model = torch.nn.Linear(8, 4, bias=False)
    hwt.bind(model, client.attach("lin@v1", holder="v1"))
    hwt.bind(model, client.attach("lin@v2", holder="v2"))
    gc.collect()
    assert float(model.weight[0, 0]) == 2.0
    assert [a.key for a in hwt.attachments_of(model)] == ["lin@v2"]
    assert [le["holder"] for le in daemon.wait_status(lambda st: len(st["leases"]) == 1)["leases"]] == ["v2"]
    daemon.cli("unload", "lin@v1", check=True)  # nothing holds v1 any more


def test_a_bound_module_can_be_deep_copied_and_saved_like_any_other(client, tmp_path):
    import copy

    import hotweights.torch as hwt

    ckpt = write_model(tmp_path / "lin.safetensors", {"weight": torch.randn(4, 8), "bias": torch.randn(4)})
    client.load("lin", ckpt)
    with hwt.skeleton():
        model = torch.nn.Linear(8, 4)
    hwt.bind(model, client.attach("lin"))
    twin = copy.deepcopy(model)  # private copies of the weights: the lease is not copied
    assert torch.equal(twin(torch.ones(1, 8)), model(torch.ones(1, 8)))
    assert hwt.attachments_of(twin) == []
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded.weight, model.weight)


def test_a_lease_the_restarted_daemon_no_longer_knows_reads_as_ended(sockdir, tmp_path):
    import hotweights
    from hotweightsd.persist.fdstore import state_path
    from support.daemons import start_daemon, wait_until

    sock = str(sockdir / "gone.sock")
    d = start_daemon(sock)
    d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
    c = hotweights.connect(sock)
    att = c.attach("m@v1")
    assert not att.released
    assert d.stop() == 0
    state_path(sock).unlink()  # the restarted daemon knows nothing of m@v1
    d = start_daemon(sock)
    try:
        wait_until(lambda: att.released, what="the refused re-lease to end the attachment")
        assert "m@v1" in att._lease.lost
        with pytest.raises(errors.FailedPrecondition, match="m@v1"):
            att["f32"]
    finally:
        c.close()
        assert d.stop() == 0
