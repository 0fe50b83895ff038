"""How long a lease lives on the client side: as long as a module bound to it, and no longer than the
client it runs on. A real daemon (cpu backend) on a real socket; the client is this process."""

from __future__ import annotations

import gc

import torch

from support.ckpt_tools import write_model


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
