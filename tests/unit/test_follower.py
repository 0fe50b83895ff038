"""``Follower`` against a stand-in client: what it releases when it is closed mid-change."""

from __future__ import annotations

import threading

from hotweights.client import Follower


class _Att:
    def __init__(self, key: str, moved) -> None:
        self.key, self.moved, self.released = key, moved, False

    def release(self) -> None:
        self.released = True


class _Client:
    def __init__(self) -> None:
        self.made: list[_Att] = []

    def attach(self, alias, rank, holder="", on_alias_moved=None):
        att = _Att(f"m@v{len(self.made) + 1}", on_alias_moved)
        self.made.append(att)
        return att


def test_a_version_taken_after_close_gave_up_waiting_is_released_when_on_change_returns():
    inside, go = threading.Event(), threading.Event()

    def on_change(att):
        if att.key != "m@v1":  # a slow engine: still taking v2 when the caller closes
            inside.set()
            go.wait()

    client = _Client()
    follower = Follower(client, "prod", on_change, 0, "test")
    client.made[0].moved(None)  # the alias moves to v2
    assert inside.wait(30)
    follower.close(timeout=0)  # does not wait for on_change
    assert client.made[0].released
    go.set()
    follower._thread.join(30)
    assert not follower._thread.is_alive()
    assert [a.released for a in client.made] == [True, True]


def test_a_version_taken_before_close_is_released_by_close():
    client = _Client()
    follower = Follower(client, "prod", lambda att: None, 0, "test")
    follower.close()
    assert [a.released for a in client.made] == [True]
