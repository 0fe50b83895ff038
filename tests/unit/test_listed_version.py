"""Client.listed_version: a version's entry from an earlier listing where it was READY there, else listed now."""

from __future__ import annotations

from hotweights.client import Client
from hotweights.wire.pb import pb

READY = pb.ModelState.Value("READY")
LOADING = pb.ModelState.Value("LOADING")


def listing(*entries: tuple[str, str, int]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(versions=[pb.ModelVersionInfo(name=n, version=v, state=s) for n, v, s in entries])


class Counting(Client):
    """A client whose listing is given, counting the calls (no daemon: only the lookup is under test)."""

    def __init__(self, now: pb.ListModelsResponse) -> None:
        self.now, self.calls = now, 0

    def list(self) -> pb.ListModelsResponse:
        self.calls += 1
        return self.now


def test_a_version_ready_in_the_earlier_listing_is_taken_from_it():
    client = Counting(listing(("m", "v1", READY)))
    got = client.listed_version("m", "v1", listing(("m", "v0", READY), ("m", "v1", READY)))
    assert (got.name, got.version, client.calls) == ("m", "v1", 0)


def test_a_version_loading_or_missing_in_the_earlier_listing_is_listed_again():
    client = Counting(listing(("m", "v1", READY)))
    assert client.listed_version("m", "v1", listing(("m", "v1", LOADING))).state == READY
    assert client.listed_version("m", "v1", listing(("m", "v0", READY))).state == READY
    assert client.listed_version("m", "v1").state == READY
    assert client.calls == 3


def test_a_version_the_daemon_does_not_list_is_none():
    client = Counting(listing(("m", "v0", READY)))
    assert client.listed_version("m", "v1") is None and client.calls == 1
