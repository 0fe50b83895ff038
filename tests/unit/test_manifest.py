"""verify_checkpoint: the check the daemon's LoadModel runs (verify=none|fast|full)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotweights.errors import (
    BadCheckpoint,
    ChecksumMismatch,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutsideModelRoots,
)
from hotweights.format.manifest import load_manifest, verify_checkpoint
from support.tp_forward import build_model, shard_cached, source_tensors


@pytest.fixture
def sharded(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(shard_cached("llama_gqa", 2, parts_per_rank=2), d)
    return d


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_levels_pass_on_a_good_checkpoint(sharded):
    for level in ("none", "fast", "full"):
        verify_checkpoint(sharded, level)
    verify_checkpoint(sharded / "model-rank-0-part-0.safetensors", "full")  # a file inside: its directory


def test_unknown_level(sharded):
    with pytest.raises(InvalidArgument, match="verify level must be one of none, fast, full"):
        verify_checkpoint(sharded, "paranoid")


def test_none_checks_nothing(sharded):
    (sharded / "model-rank-1-part-1.safetensors").unlink()
    verify_checkpoint(sharded, "none")


def test_without_manifest_fast_is_a_noop_and_full_fails(tmp_path):
    src, _ = build_model("llama_gqa")
    verify_checkpoint(src, "fast")
    verify_checkpoint(src / "model.safetensors", "fast")
    with pytest.raises(FailedPrecondition, match=r"verify=full needs hotweights\.json"):
        verify_checkpoint(src, "full")


def test_missing_path(tmp_path):
    with pytest.raises(NotFound):
        verify_checkpoint(tmp_path / "nope", "fast")


@pytest.mark.parametrize(
    "name",
    [
        "model-rank-0-part-0.safetensors",
        "model-rank-0-part-1.safetensors",
        "model-rank-1-part-0.safetensors",
        "model-rank-1-part-1.safetensors",
    ],
)
@pytest.mark.parametrize("where", ["first data byte", "last byte"])
def test_full_catches_a_flipped_data_byte_and_names_the_file(sharded, name, where):
    p = sharded / name
    header_len = int.from_bytes(p.read_bytes()[:8], "little")
    flip(p, 8 + header_len if where == "first data byte" else p.stat().st_size - 1)
    verify_checkpoint(sharded, "fast")  # sizes and headers are intact: fast cannot see it
    with pytest.raises(ChecksumMismatch, match=name) as info:
        verify_checkpoint(sharded, "full")
    assert info.value.details["file"] == name
    assert isinstance(info.value, DataLoss)


def test_a_flipped_header_byte_is_caught_by_both_levels(sharded):
    name = "model-rank-1-part-0.safetensors"
    p = sharded / name
    raw = p.read_bytes()
    at = raw.index(b'"shape":[') + len(b'"shape":[')  # a digit of the first shape: the header still parses
    flip(p, at)
    with pytest.raises(DataLoss, match=name):
        verify_checkpoint(sharded, "fast")
    with pytest.raises(ChecksumMismatch, match=name):
        verify_checkpoint(sharded, "full")


def test_truncated_file(sharded):
    name = "model-rank-0-part-1.safetensors"
    p = sharded / name
    os.truncate(p, p.stat().st_size - 3)
    with pytest.raises(DataLoss, match=rf"{name}: \d+ bytes, hotweights\.json says \d+"):
        verify_checkpoint(sharded, "fast")


def test_missing_file(sharded):
    (sharded / "model-rank-1-part-1.safetensors").unlink()
    with pytest.raises(DataLoss, match=r"model-rank-1-part-1\.safetensors: missing"):
        verify_checkpoint(sharded, "fast")


def test_rewritten_file_with_the_same_size(sharded):
    # Another tensor of identical byte size under a different name: sizes agree, the header does not.
    name = "model-rank-0-part-0.safetensors"
    from safetensors import safe_open

    with safe_open(sharded / name, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tensors[first[:-1] + "X"] = tensors.pop(first)
    save_file(tensors, sharded / name, metadata={"format": "pt"})
    # a name of equal length: the size stays, so only the header tells the two apart
    assert (sharded / name).stat().st_size == load_manifest(sharded).files[name]["size"], "the rewrite changed the size"
    with pytest.raises(DataLoss, match=rf"{name}: tensor .* (is missing|is not in the manifest)"):
        verify_checkpoint(sharded, "fast")


def test_tampered_config_is_caught(sharded):
    cfg = sharded / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ChecksumMismatch, match=r"config\.json"):
        verify_checkpoint(sharded, "full")


def test_extra_shard_file_is_a_layout_error(sharded):
    shutil.copy(sharded / "model-rank-1-part-1.safetensors", sharded / "model-rank-1-part-2.safetensors")
    with pytest.raises(BadCheckpoint, match=r"model-rank-1-part-2\.safetensors is not in hotweights\.json"):
        verify_checkpoint(sharded, "fast")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: "not json", "cannot read it as JSON"),
        (lambda d: {**d, "format": "other"}, "not a hotweights manifest"),
        (lambda d: {**d, "format_version": 99}, "format_version 99"),
        (lambda d: {**d, "tp_size": 3}, r"lists no files for rank\(s\) \[2\]"),
        (lambda d: {**d, "files": {"weights.bin": {"rank": 0, "size": 1, "xxh64": "0"}}}, "weights.bin"),
        (
            lambda d: {**d, "tensors": [{**d["tensors"][0], "file": "model-rank-9-part-0.safetensors"}]},
            "names a file the manifest does not list",
        ),
    ],
)
def test_malformed_manifest(sharded, edit, match):
    path = sharded / "hotweights.json"
    doc = edit(json.loads(path.read_text()))
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(BadCheckpoint, match=match):
        verify_checkpoint(sharded, "fast")


def test_rank_weight_bytes_are_the_tensor_bytes(sharded):
    m = load_manifest(sharded)
    src, _ = build_model("llama_gqa")
    total = sum(t.numel() * t.element_size() for t in source_tensors(src).values())
    per_rank = m.rank_weight_bytes()
    # 2 KV heads on 2 ranks: nothing but the norms is replicated.
    norms = sum(t.numel() * 4 for n, t in source_tensors(src).items() if "norm" in n)
    assert sum(per_rank) == total + norms
    for r in range(2):
        on_disk = sum((sharded / n).stat().st_size for n, f in m.files.items() if f["rank"] == r)
        assert per_rank[r] < on_disk < per_rank[r] + 2 * 4096


def test_same_tensors_reordered_is_caught(sharded):
    """A file rewritten with the same tensors, names, shapes and size, in another order."""
    from safetensors import safe_open

    name = "model-rank-1-part-0.safetensors"
    p = sharded / name
    with safe_open(p, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header_len = int.from_bytes(p.read_bytes()[:8], "little")
    written = json.loads(p.read_bytes()[8 : 8 + header_len])
    doc, blobs, offset = {}, [], 0
    for k in sorted(tensors, key=lambda k: written[k]["data_offsets"][0], reverse=True):
        raw = tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        doc[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps(doc, separators=(",", ":")).encode()
    header += b" " * (header_len - len(header))  # same header length: only the offsets differ
    assert len(header) == header_len
    p.write_bytes(header_len.to_bytes(8, "little") + header + b"".join(blobs))
    assert p.stat().st_size == load_manifest(sharded).files[name]["size"]
    with pytest.raises(DataLoss, match=rf"{name}: tensor .* at offset \d+, the manifest says .* at \d+"):
        verify_checkpoint(sharded, "fast")


def _confined(root: Path):
    """The daemon's model-roots check for ``root``: what it passes to verify_checkpoint as ``allow``."""
    from hotweightsd.core.roots import ModelRoots

    return ModelRoots([str(root)]).check


def _list_aux(ckpt: Path, name: str, size: int) -> None:
    path = ckpt / "hotweights.json"
    doc = json.loads(path.read_text())
    doc["aux_files"][name] = {"size": size, "xxh64": "0"}
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("name", ["../../etc/shadow", "..", ".", "sub/../../x", "a\0b", ""])
def test_a_side_file_outside_the_checkpoint_directory_is_refused(tmp_path, sharded, name):
    """The manifest may list only files of its own directory: a name that leads elsewhere (the parent
    directory too, whose size a size check would otherwise stat and compare) is refused, naming it."""
    size = sharded.parent.stat().st_size if name == ".." else sharded.stat().st_size if name == "." else 1
    _list_aux(sharded, name, size)
    for level in ("fast", "full"):
        with pytest.raises(BadCheckpoint, match=rf"entry for file {re.escape(repr(name))} is malformed"):
            verify_checkpoint(sharded, level, allow=_confined(tmp_path))


def test_a_side_file_linked_out_of_the_model_roots_is_refused(tmp_path):
    """A side file (config.json) that is a link to a file outside the roots is refused before it is
    read or even sized: its size and content must not be learned through the checks."""
    root = tmp_path / "models"
    ckpt = root / "ckpt"
    shutil.copytree(shard_cached("llama_gqa", 2, parts_per_rank=2), ckpt)
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    shutil.copy(ckpt / "config.json", secret)  # same size and content: every check would pass on it
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(secret)
    verify_checkpoint(ckpt, "full")  # unconfined: the link is followed
    refused = r"config\.json is outside the model roots \(it leads to .*secret\)"
    for level in ("fast", "full"):
        with pytest.raises(OutsideModelRoots, match=refused):
            verify_checkpoint(ckpt, level, allow=_confined(root))


def test_a_shard_the_load_did_not_open_is_checked_through_the_roots_too(tmp_path):
    """Files the caller did not open (here, none) are opened by the check itself, under ``allow``."""
    root = tmp_path / "models"
    ckpt = root / "ckpt"
    shutil.copytree(shard_cached("llama_gqa", 2, parts_per_rank=2), ckpt)
    name = "model-rank-1-part-0.safetensors"
    outside = tmp_path / "outside"
    outside.mkdir()
    (ckpt / name).rename(outside / name)
    (ckpt / name).symlink_to(outside / name)
    with pytest.raises(OutsideModelRoots, match=rf"{re.escape(name)} is outside the model roots"):
        verify_checkpoint(ckpt, "fast", allow=_confined(root))


def test_a_side_file_that_is_not_a_regular_file_is_refused(sharded):
    (sharded / "config.json").unlink()
    os.mkfifo(sharded / "config.json")  # never opened for reading: open_file does not block on it
    with pytest.raises(BadCheckpoint, match=r"config\.json: a FIFO, not a regular file"):
        verify_checkpoint(sharded, "fast")


def test_a_manifest_listing_more_side_files_than_the_daemon_opens_is_refused(sharded):
    from hotweights.format.manifest import MAX_AUX_FILES

    path = sharded / "hotweights.json"
    doc = json.loads(path.read_text())
    doc["aux_files"] = {f"f{i}.json": {"size": 1, "xxh64": "0"} for i in range(MAX_AUX_FILES + 1)}
    path.write_text(json.dumps(doc))
    with pytest.raises(BadCheckpoint, match=rf"lists {MAX_AUX_FILES + 1} side files \(aux_files\); at most"):
        verify_checkpoint(sharded, "fast")
