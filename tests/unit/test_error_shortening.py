"""Error messages quote client strings by a short prefix; what goes out on the wire stays under gRPC's
16 KiB metadata limit whatever the error carries."""

from __future__ import annotations

import json

from hotweights import errors
from hotweights.wire.status import CLASS_KEY, DETAILS_KEY, MAX_DETAILS, MAX_MESSAGE, short_message, trailing_metadata


def test_shorten_keeps_short_strings_and_cuts_long_ones():
    assert errors.shorten("m@v1") == "m@v1"
    assert errors.shorten("x" * 200) == "x" * 200
    assert errors.shorten("x" * 201) == "x" * 200 + "…(201 bytes)"
    assert errors.shorten("é" * 300, 10) == "é" * 10 + "…(600 bytes)"
    assert errors.shorten(12345, 3) == "123…(5 bytes)"


def test_trailing_metadata_stays_small_for_huge_details():
    err = errors.NotFound("gone", ref="x" * 70_000, many=["y" * 10_000] * 500, nested={"k" * 9_000: "v" * 9_000})
    meta = dict(trailing_metadata(err))
    assert meta[CLASS_KEY] == "NotFound"
    assert len(meta[DETAILS_KEY]) <= MAX_DETAILS
    assert meta[DETAILS_KEY].isascii()
    details = json.loads(meta[DETAILS_KEY])
    assert details.get("truncated") or details["ref"].endswith("…(70000 bytes)")


def test_trailing_metadata_keeps_ordinary_details():
    err = errors.InsufficientMemory("no room", needed=10, free=3, path="/models/m")
    assert json.loads(dict(trailing_metadata(err))[DETAILS_KEY]) == {"needed": 10, "free": 3, "path": "/models/m"}


def test_status_message_is_cut_by_its_encoded_size():
    assert short_message("fine") == "fine"
    for ch in ("x", "é", "\U0001f600"):
        msg = short_message(ch * 50_000)
        assert len(msg.encode()) <= MAX_MESSAGE
        assert msg.endswith(f"…({len((ch * 50_000).encode())} bytes)")
