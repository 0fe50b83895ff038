"""The ring's shape is bounded where the settings are made, by the limits the native engine itself checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hotweights.errors import InvalidArgument
from hotweightsd.config import load_config
from hotweightsd.loaders import native
from hotweightsd.loaders.settings import MAX_DEPTH, MAX_THREADS, LoaderSettings

HWFILL = Path(native.__file__).with_name("hwfill.c")


def test_the_settings_hold_the_ring_to_the_native_engines_limits():
    LoaderSettings(threads=MAX_THREADS, ring_depth=MAX_DEPTH)
    with pytest.raises(InvalidArgument, match="loader ring depth must be at most 64"):
        LoaderSettings(ring_depth=MAX_DEPTH + 1)
    with pytest.raises(InvalidArgument, match="loader threads must be at most 1024"):
        LoaderSettings(threads=MAX_THREADS + 1)


def test_the_config_names_the_key_whose_value_is_beyond_the_engines_limit():
    cfg = load_config("none", {"loader_threads": str(MAX_THREADS), "ring_depth": str(MAX_DEPTH)}, env={})
    assert (cfg.loader_threads, cfg.ring_depth) == (MAX_THREADS, MAX_DEPTH)
    with pytest.raises(InvalidArgument, match=r"ring_depth \(flag --ring-depth\) must be at most 64, got '65'"):
        load_config("none", {"ring_depth": "65"}, env={})
    with pytest.raises(InvalidArgument, match=r"loader_threads \(env HOTWEIGHTS_LOADER_THREADS\) must be at most 1024"):
        load_config("none", env={"HOTWEIGHTS_LOADER_THREADS": "2000"})


def test_the_limits_are_the_ones_hwfill_c_is_built_with():
    source = HWFILL.read_text()
    defined = {m[1]: int(m[2]) for m in re.finditer(r"#define (HW_MAX_\w+) (\d+)", source)}
    assert defined == {"HW_MAX_THREADS": MAX_THREADS, "HW_MAX_DEPTH": MAX_DEPTH}


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="no native loader built here")
def test_a_library_built_with_other_limits_is_refused(monkeypatch):
    path = native.library_path()
    monkeypatch.setattr(native, "MAX_DEPTH", MAX_DEPTH - 1)
    lib, why = native._open(path)
    assert lib is None and why is not None and "rebuild it" in why and f"{MAX_THREADS} x {MAX_DEPTH - 1}" in why
