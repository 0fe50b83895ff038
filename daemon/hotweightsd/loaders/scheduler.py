"""How fills running at once in one process (ranks of a model on different GPUs) share the host.

One ``FillScheduler`` per backend: the manager announces a model's ranks before starting them
(``announce``), every fill registers while it runs (``fill``), and both feed one count of fills at
once. A native fill running beside others takes an equal share of the cores (``readers``); a
python-workers fill reads runs of neighbouring chunks while others run (``others_running``).
docs/loader.md has the measurements behind both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

SPARE_CORES = 4  # left to the driver and the kernel
SHARED_FRACTION = 0.75  # of the cores less the spare ones, split among native fills at once
MIN_SHARED_READERS = 4


class FillScheduler:
    def __init__(self, cores: int, share_cores: bool = True) -> None:
        self.cores = cores
        self.share_cores = share_cores
        self._lock = threading.Lock()
        self._running = 0  # fills running now, every device
        self._announced = 0  # fills announced as starting together, not all necessarily running yet

    @contextmanager
    def announce(self, devices: Sequence[int]) -> Iterator[None]:
        """Wraps the fills of a model's ranks, one per entry of ``devices``: the first to start already
        counts the others (counting starts would race). Ranks placed on one device take turns on its
        ring, so they count once."""
        n = len(set(devices))
        with self._lock:
            self._announced += n
        try:
            yield
        finally:
            with self._lock:
                self._announced -= n

    @contextmanager
    def fill(self) -> Iterator[int]:
        """Registers a running fill; yields how many fills run at once, this one and announced ones included."""
        with self._lock:
            self._running += 1
            at_once = max(self._running, self._announced)
        try:
            yield at_once
        finally:
            with self._lock:
                self._running -= 1

    def others_running(self) -> bool:
        return self._running > 1

    def readers(self, ring_threads: int, at_once: int) -> int:
        """Readers for one native fill: its ring's count alone; beside others, an equal share of
        SHARED_FRACTION of the cores less SPARE_CORES (at least MIN_SHARED_READERS, at most the ring's)."""
        if not self.share_cores or at_once <= 1:
            return ring_threads
        share = int((self.cores - SPARE_CORES) * SHARED_FRACTION) // at_once
        return max(min(MIN_SHARED_READERS, ring_threads), min(ring_threads, share))
