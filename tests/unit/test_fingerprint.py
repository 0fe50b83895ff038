"""The default version (``Checkpoint.fingerprint``): the same bytes give the same version wherever they
lie; other weights of the same shapes give another, from a few sampled blocks or the manifest's sums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hotweights.format.checkpoint import FINGERPRINT_SAMPLE, open_checkpoint
from support.ckpt_tools import write_model

# Big enough that the samples do not cover the whole of the data.
ROWS = 4 * FINGERPRINT_SAMPLE // (4 * 256)


def model(path: Path, seed: int, rows: int = ROWS) -> Path:
    g = torch.Generator().manual_seed(seed)
    return write_model(path, {"w": torch.randn(rows, 256, generator=g), "b": torch.randn(256, generator=g)})


def fingerprint(path: Path) -> str:
    with open_checkpoint(path) as ckpt:
        return ckpt.fingerprint()


def test_other_weights_of_the_same_shapes_get_another_version(tmp_path):
    a, b = model(tmp_path / "a" / "m.safetensors", 1), model(tmp_path / "b" / "m.safetensors", 2)
    assert a.stat().st_size == b.stat().st_size
    assert fingerprint(a.parent) != fingerprint(b.parent)


def test_the_same_bytes_elsewhere_get_the_same_version(tmp_path):
    a = model(tmp_path / "a" / "m.safetensors", 1)
    copy = tmp_path / "elsewhere" / "m.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(a, copy)
    assert fingerprint(a) == fingerprint(copy) == fingerprint(a)


def test_each_sampled_place_counts(tmp_path):
    a = model(tmp_path / "a.safetensors", 1)
    base = fingerprint(a)
    size = a.stat().st_size
    for offset in (size - 1, size // 2 + 8):  # the last block, the middle one
        b = tmp_path / f"b{offset}.safetensors"
        data = bytearray(a.read_bytes())
        data[offset] ^= 0xFF
        b.write_bytes(bytes(data))
        assert fingerprint(b) != base, offset


def test_a_small_file_is_hashed_whole(tmp_path):
    a = model(tmp_path / "a.safetensors", 1, rows=4)
    data = bytearray(a.read_bytes())
    data[len(data) // 3] ^= 0xFF
    b = tmp_path / "b.safetensors"
    b.write_bytes(bytes(data))
    assert fingerprint(a) != fingerprint(b)


def test_the_manifests_checksums_count(tmp_path):
    d = tmp_path / "m"
    model(d / "model.safetensors", 1)
    (d / "hotweights.json").write_text(json.dumps({"files": {"model.safetensors": {"xxh64": "0" * 16}}}))
    first = fingerprint(d)
    (d / "hotweights.json").write_text(json.dumps({"files": {"model.safetensors": {"xxh64": "1" * 16}}}))
    assert fingerprint(d) != first
    (d / "hotweights.json").write_text("not json")  # verify reports it; the version does not fail
    assert len(fingerprint(d)) == 12
