"""Regressions for the review of the checkpoint tooling and format readers (findings F1-F17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotweights.errors import BadCheckpoint
from hotweights.format import safetensors as st
from hotweights.format.safetensors import parse_header


def _no_parse(monkeypatch) -> None:
    """Fails the test if the header's JSON gets parsed: the guard must refuse before."""

    def boom(*a, **k):
        raise AssertionError("json.loads ran on a header the pre-parse guard should have refused")

    monkeypatch.setattr(st.json, "loads", boom)


# F13: the pre-parse bound holds whatever the spelling of the keys.


def test_escaped_key_spelling_is_refused_before_the_parse(monkeypatch):
    n = 2000
    entry = '"t{i}":{{"dtype":"U8","shape":[1],"data\\u005foffsets":[{i},{j}]}}'
    raw = ("{" + ",".join(entry.format(i=i, j=i + 1) for i in range(n)) + "}").encode()
    assert raw.count(b'"data_offsets"') == 0  # the old count saw no entry at all
    _no_parse(monkeypatch)
    with pytest.raises(BadCheckpoint, match=r"header holds \d+ JSON members and array elements") as info:
        parse_header(Path("esc.safetensors"), 8 + len(raw) + n, raw, max_tensors=10)
    assert info.value.details["limit"] == 12 * 10 + 8192


def test_junk_keys_in_one_entry_are_refused_before_the_parse(monkeypatch):
    junk = ",".join(f'"k{i}":0' for i in range(20_000))
    raw = ('{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0],' + junk + "}}").encode()
    _no_parse(monkeypatch)
    with pytest.raises(BadCheckpoint, match="JSON members and array elements"):
        parse_header(Path("junk.safetensors"), 8 + len(raw), raw, max_tensors=10)


def test_a_few_junk_keys_in_an_entry_are_refused_naming_one():
    raw = b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"zz":1,"extra":2}}'
    with pytest.raises(BadCheckpoint, match=r"tensor 't': entry holds 2 key\(s\) besides .*first 'extra'"):
        parse_header(Path("junk.safetensors"), 8 + len(raw) + 1, raw)


def test_separators_inside_strings_do_not_count():
    # Metadata text full of ':' and ',' (a JSON document kept as a string) builds nothing: recounted without it.
    meta = {"notes": json.dumps({f"k{i}": [i, i] for i in range(5000)})}
    doc = {"__metadata__": meta, "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    raw = json.dumps(doc).encode()
    assert raw.count(b":") + raw.count(b",") > 12 * 10 + 8192
    h = parse_header(Path("meta.safetensors"), 8 + len(raw) + 2, raw, max_tensors=10)
    assert [t.name for t in h.tensors] == ["a"] and h.metadata == meta


def test_a_header_at_the_tensor_limit_passes_the_guard():
    n = 50
    doc = {f"t{i}": {"dtype": "U8", "shape": [1, 1, 1, 1], "data_offsets": [i, i + 1]} for i in range(n)}
    doc["__metadata__"] = {"format": "pt"}
    raw = json.dumps(doc).encode()
    assert len(parse_header(Path("ok.safetensors"), 8 + len(raw) + n, raw, max_tensors=n).tensors) == n


# F16: dimensions an int64 cannot hold are refused even when the tensor has no elements.


@pytest.mark.parametrize("shape", [[2**70, 0], [2**63, 0], [0, 2**40, 2**40], [2**32, 2**31, 0]])
def test_dimensions_beyond_int64_are_refused(shape):
    doc = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "huge": {"dtype": "BF16", "shape": shape, "data_offsets": [1, 1]},
    }
    raw = json.dumps(doc).encode()
    with pytest.raises(BadCheckpoint, match=r"tensor 'huge': shape .* is beyond what an int64 holds"):
        parse_header(Path("big.safetensors"), 8 + len(raw) + 1, raw)


def test_large_but_representable_zero_size_dimension_is_accepted():
    raw = json.dumps({"z": {"dtype": "BF16", "shape": [2**62, 0], "data_offsets": [0, 0]}}).encode()
    assert parse_header(Path("z.safetensors"), 8 + len(raw), raw).tensors[0].shape == (2**62, 0)
