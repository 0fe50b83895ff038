"""Socket resolution and the unreachable-daemon diagnosis moved from hotweights.client to hotweights.reach;
code that imported them from hotweights.client still gets the same objects."""

from __future__ import annotations

import pytest

import hotweights.client
import hotweights.reach

MOVED = ["DEFAULT_ORIGIN", "resolve_socket", "resolve_operator_socket", "diagnose_unreachable", "operator_unreachable"]


@pytest.mark.parametrize("name", MOVED)
def test_the_moved_names_are_still_importable_from_the_client(name):
    assert getattr(hotweights.client, name) is getattr(hotweights.reach, name)
