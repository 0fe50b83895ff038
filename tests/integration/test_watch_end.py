"""How a Client.watch() iteration ends, on a real daemon: the daemon stopping is a typed error for the
watcher; a stop the caller made (cancel(), closing the client, leaving the loop) ends it quietly."""

from __future__ import annotations

import threading

import grpc

import hotweights
from hotweights import errors
from support.ckpt_tools import write_model
from support.daemons import start_daemon, wait_until


class Reader:
    """Iterates a watch on a thread of its own; ``outcome`` is "ended" or the exception it raised."""

    def __init__(self, watch) -> None:
        self.watch = watch
        self.events: list = []
        self.outcome: object = None
        watch.wait_subscribed()  # no event can be missed after
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.watch:
                self.events.append(ev)
            self.outcome = "ended"
        except BaseException as exc:
            self.outcome = exc

    def result(self, timeout: float = 20.0) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the watch did not end"
        return self.outcome


def test_a_watcher_sees_the_daemon_stopping_as_unavailable_not_an_end(sockdir, tmp_path):
    d = start_daemon(str(sockdir / "hw.sock"))
    try:
        c = hotweights.connect(d.socket)
        reader = Reader(c.watch(""))
        d.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
        wait_until(lambda: reader.events, what="the watcher to see the load")
        assert d.stop() == 0, d.logs()
        outcome = reader.result()
        assert isinstance(outcome, errors.Unavailable), outcome
        c.close()
    finally:
        if d.alive():
            d.stop()


def test_a_watch_the_caller_stops_ends_quietly(daemon, tmp_path):
    with hotweights.connect(daemon.socket) as c:
        cancelled = Reader(c.watch(""))
        cancelled.watch.cancel()  # from another thread than the one iterating
        assert cancelled.result() == "ended"

        watch = c.watch("").wait_subscribed()
        daemon.cli("load", "m", str(write_model(tmp_path / "m.safetensors")), "--version", "v1", check=True)
        for _ in watch:
            break  # leaving the loop closes the iterator, which stops the stream
        wait_until(watch._call.done, what="the stream to end once its iterator is closed")
        assert watch._call.code() == grpc.StatusCode.CANCELLED
        assert list(watch) == []  # and iterating it again ends at once, quietly

        closed = Reader(c.watch(""))
    assert closed.result() == "ended"  # the client closed under it
    assert daemon.alive()
