"""A call run in a thread of its own, for tests that must go on while it blocks (or check that it does not)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def started(fn: Callable[[], Any]) -> Callable[[float], Any]:
    """Starts ``fn()`` in a daemon thread; returns ``join(timeout)``, which gives its result or raises its
    error, and raises AssertionError if it is still running after ``timeout`` seconds."""
    out: dict[str, Any] = {}

    def call() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()

    def join(timeout: float) -> Any:
        t.join(timeout)
        assert not t.is_alive(), f"{fn} still running after {timeout} s"
        if "error" in out:
            raise out["error"]
        return out["value"]

    return join
