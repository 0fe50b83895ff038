"""The daemon loads a sharded directory with verify=full and attaches every rank;
a flipped byte in any shard is caught and the error names the file.

Only the public client API is used: ``hotweights.connect``, ``Client.load``, ``Client.attach``.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import hotweights
from hotweights.errors import DataLoss
from support.tp_forward import load_rank, shard_cached


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x80]))


@pytest.mark.parametrize("options", [{}, {"dtype": "bfloat16", "quantize": "fp8"}], ids=["fp32", "fp8"])
def test_load_verify_full_and_attach_every_rank(daemon, options):
    d = shard_cached("mixtral", 2, parts_per_rank=2, **options)
    c = hotweights.connect(daemon.socket)
    try:
        c.load("tiny-moe", str(d), verify="full")
        for rank in range(2):
            want = load_rank(d, rank)
            with c.attach("tiny-moe", rank=rank) as tensors:
                assert sorted(tensors) == sorted(want)
                for name, w in want.items():
                    got = tensors[name]
                    assert got.dtype == w.dtype and got.shape == w.shape, name
                    assert torch.equal(got.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name
    finally:
        c.close()


def test_a_flipped_byte_in_any_shard_is_caught_and_named(daemon, tmp_path):
    good = shard_cached("llama_gqa", 2, parts_per_rank=2)
    c = hotweights.connect(daemon.socket)
    try:
        for i, name in enumerate(sorted(p.name for p in good.glob("model-rank-*.safetensors"))):
            d = tmp_path / f"bad-{i}"
            shutil.copytree(good, d)
            p = d / name
            flip_byte(p, p.stat().st_size // 2 + i)  # somewhere in the tensor data
            with pytest.raises(DataLoss) as info:
                c.load(f"bad-{i}", str(d), verify="full")
            assert name in str(info.value), str(info.value)
        assert not any(v.name.startswith("bad-") for v in c.list().versions)
    finally:
        c.close()
