"""Drain swaps wait for other clients' leases to end; however many wait at once, the daemon keeps
answering other clients, and the lease ends they wait for still reach it."""

from __future__ import annotations

import threading

import hotweights
from hotweights.wire.pb import pb
from hotweightsd.server.service import CALL_THREADS
from support.ckpt_tools import versioned_model as versioned
from support.daemons import wait_until

DEADLINE = 60.0  # far beyond what any step here needs: a wait that reaches it is the failure


def test_more_drain_swaps_than_call_threads_leave_attaches_and_lease_ends_answered(daemon, client, tmp_path):
    n = CALL_THREADS + 4  # more waiting drains than the call pool has threads
    v1, v2 = versioned(tmp_path, 1), versioned(tmp_path, 2)
    for i in range(n + 1):
        client.load(f"m{i}", str(v1), version="v1", alias=f"a{i}")
    serving = hotweights.connect(daemon.socket)
    held = [serving.attach(f"a{i}") for i in range(n)]
    results: dict[int, str] = {}
    done = threading.Semaphore(0)

    def drain_swap(i: int) -> None:
        try:
            with hotweights.connect(daemon.socket) as c:
                # a drain timeout far beyond the test's deadlines: a drain that ends did so for its lease
                info = c.swap(f"a{i}", str(v2), version="v2", mode="drain", drain_timeout=2 * DEADLINE)
                results[i] = info.version
        except Exception as exc:
            results[i] = f"{type(exc).__name__}: {exc}"
        finally:
            done.release()

    swaps = [threading.Thread(target=drain_swap, args=(i,), name=f"drain-swap-{i}", daemon=True) for i in range(n)]
    for t in swaps:
        t.start()
    try:
        # every drain is waiting on its lease at once
        wait_until(
            lambda: sum(v.state == pb.DRAINING for v in client.status().versions) == n,
            timeout=DEADLINE,
            what=f"all {n} drains waiting",
        )

        # a reader of an unrelated model is answered meanwhile
        attached = threading.Event()
        other: list[object] = []

        def attach_other() -> None:
            with hotweights.connect(daemon.socket) as c:
                a = c.attach(f"a{n}")
                other.append(a.version)
                a.release()
            attached.set()

        threading.Thread(target=attach_other, name="unrelated-attach", daemon=True).start()
        assert attached.wait(DEADLINE), "an unrelated attach was not answered while drains waited"
        assert other == ["v1"]
    finally:
        # the lease ends the drains wait for reach the daemon, and end them
        for a in held:
            a.release()
    for _ in range(n):
        assert done.acquire(timeout=DEADLINE), f"drains still waiting after their leases ended: {results}"
    assert results == {i: "v2" for i in range(n)}
    st = client.status()
    assert {(a.alias, a.version) for a in st.aliases} == {(f"a{i}", "v2") for i in range(n)} | {(f"a{n}", "v1")}
    assert list(st.leases) == []
    serving.close()
