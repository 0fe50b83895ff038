"""Every thread the daemon starts carries its Python name at the OS level (``top -H``, ``ps -L``,
/proc/<pid>/task/*/comm): ``hw-call_3``, ``hw-rank_0``, ``hw-native-fill`` (whose C readers inherit it).

Python before 3.14 leaves every thread named after the process. ``threading.setprofile`` installs a
function in each thread started from then on, called once as it starts to run: it copies the thread's
name to the OS (15 bytes at most) and removes itself, so nothing is left running per call.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

PR_SET_NAME = 15
_prctl: Any = None


def os_thread_name(name: str) -> None:
    """Names the calling thread for the OS; a platform without prctl keeps the process's name."""
    global _prctl
    try:
        if _prctl is None:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        _prctl(PR_SET_NAME, name.encode(errors="replace")[:15], 0, 0, 0)
    except Exception:  # a nicety: never a reason for a thread to fail
        pass


def _first_call(frame: Any, event: str, arg: Any) -> None:
    sys.setprofile(None)
    os_thread_name(threading.current_thread().name)


def name_threads() -> None:
    """From now on, every thread started through ``threading`` names itself for the OS."""
    threading.setprofile(_first_call)
