"""Threads carry their Python names at the OS level, including threads started by a named thread
(which would otherwise inherit its name, and be taken for it)."""

from __future__ import annotations

import threading

from hotweightsd import threadnames


def comm(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


def test_a_thread_started_by_a_named_thread_carries_its_own_name():
    seen: dict[str, str] = {}

    def child() -> None:
        seen["child"] = comm(threading.get_native_id())

    def worker() -> None:
        seen["worker"] = comm(threading.get_native_id())
        t = threading.Thread(target=child, name="hw-rank_0")
        t.start()
        t.join()

    threadnames.name_threads()
    try:
        t = threading.Thread(target=worker, name="hw-load_7")
        t.start()
        t.join()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert seen == {"worker": "hw-load_7", "child": "hw-rank_0"}


def test_a_long_name_is_cut_to_what_the_os_keeps():
    seen = []

    def run() -> None:
        threadnames.os_thread_name("hw-a-very-long-thread-name")
        seen.append(comm(threading.get_native_id()))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == ["hw-a-very-long-"]
