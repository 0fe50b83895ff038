"""The header reader refuses what the reference loader refuses, and bounds what one file can cost."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotweights.errors import BadCheckpoint
from hotweights.format.safetensors import MAX_TENSORS_PER_FILE, parse_header, read_header
from support.ckpt_tools import raw_file

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_a_file_safetensors_writes_is_accepted(tmp_path):
    p = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(0), "c": torch.ones(2, 2, dtype=torch.bfloat16)}, str(p))
    h = read_header(p)
    assert sorted(t.name for t in h.tensors) == ["a", "b", "c"]


def test_a_hole_between_tensors_is_refused_with_its_place(tmp_path):
    header = {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    with pytest.raises(BadCheckpoint, match=r"bytes 8-12 of the data section belong to no tensor.*after 'a'"):
        read_header(raw_file(tmp_path / "hole.safetensors", header, b"\0" * 20))


def test_bytes_before_the_first_tensor_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(BadCheckpoint, match="before the first tensor"):
        read_header(raw_file(tmp_path / "lead.safetensors", header, b"\0" * 12))


def test_trailing_bytes_are_refused(tmp_path):
    with pytest.raises(BadCheckpoint, match=r"3 trailing byte\(s\) after the last tensor") as info:
        read_header(raw_file(tmp_path / "tail.safetensors", {"a": F32x2}, b"\0" * 11))
    assert info.value.details["trailing"] == 3


def test_deeply_nested_json_is_a_typed_error():
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadCheckpoint, match="nested too deeply|not valid JSON|not a JSON object"):
        parse_header(Path("deep.safetensors"), 8 + len(raw), raw)


def test_too_many_tensors_is_refused_before_any_entry_is_checked():
    n = MAX_TENSORS_PER_FILE + 1
    doc = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    raw = json.dumps(doc).encode()
    with pytest.raises(BadCheckpoint, match=f"lists {n} tensors; the limit is {MAX_TENSORS_PER_FILE}"):
        parse_header(Path("many.safetensors"), 8 + len(raw) + n, raw)


def test_the_limit_is_a_parameter():
    doc = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(3)}
    raw = json.dumps(doc).encode()
    assert len(parse_header(Path("x"), 8 + len(raw) + 3, raw, max_tensors=3).tensors) == 3
    with pytest.raises(BadCheckpoint, match="the limit is 2"):
        parse_header(Path("x"), 8 + len(raw) + 3, raw, max_tensors=2)


def test_header_length_word_must_fit_the_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(BadCheckpoint, match="runs past the end"):
        read_header(p)


def test_zero_sized_tensors_may_share_an_offset(tmp_path):
    header = {
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        "a": F32x2,
        "f": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
    }
    h = read_header(raw_file(tmp_path / "z.safetensors", header, b"\0" * 8))
    assert len(h.tensors) == 3
