"""Tests of systemd integration start outside any service manager, whatever runs pytest.

Import ``no_service_manager`` into a test module: it is an autouse fixture there.
"""

from __future__ import annotations

import pytest

SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "FDSTORE",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


@pytest.fixture(autouse=True)
def no_service_manager(monkeypatch):
    for key in SYSTEMD_ENV:
        monkeypatch.delenv(key, raising=False)
