"""Fault injection, for tests only: stages of a load that fail on purpose.

The plan comes from the config key ``faults`` (``HOTWEIGHTS_FAULTS``, ``--faults``), comma-separated
``POINT[:after=N][:times=M]``: the point's checks numbered N+1 to N+M (counted over the daemon's life,
every load together; after=0 and times=1 unless given) raise ``InjectedFault``. It exists so that
tests/integration/test_fault_injection.py and tests/gpu/test_faults_cuda.py can fail a load at each
stage and check that nothing leaks; the default plan is empty and a check is then one attribute test.

Points, each checked where that stage's work happens:

- ``load.header``: once per load, before the checkpoint's headers are read;
- ``load.allocate``: before each allocation of each rank;
- ``load.read``: as each chunk is read from its file (python workers; the native engine is told the
  chunk's index and fails it in C);
- ``load.copy``: after each chunk is read, before it lands in the allocation (the bounce path: before its
  copies are queued; cpu and GDS read straight into the allocation, so the check follows the read);
- ``load.verify``: once per load, after every rank is filled, before the version turns READY.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from hotweights.errors import InjectedFault, InvalidArgument

POINTS = ("load.header", "load.allocate", "load.read", "load.copy", "load.verify")
# The stages a chunk passes through, in order, and their code in the native engine's job.
CHUNK_STAGES = {"load.read": 1, "load.copy": 2}


class ChunkFault(NamedTuple):
    """The check a fill outside Python fails: the chunk's index, the point, the check's number."""

    chunk: int
    point: str
    check: int


@dataclass
class _Rule:
    point: str
    after: int
    times: int
    seen: int = 0  # checks counted so far


class FaultPlan:
    """Which checks of which points fail. Thread-safe; ``FaultPlan()`` fails nothing."""

    def __init__(self, rules: Sequence[_Rule] = ()) -> None:
        self._rules = {r.point: r for r in rules}
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """``POINT[:after=N][:times=M],...``; InvalidArgument naming what is wrong."""
        rules: list[_Rule] = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            point, *opts = (p.strip() for p in item.split(":"))
            if point not in POINTS:
                raise InvalidArgument(f"faults: unknown point {point!r} in {item!r} (choose {', '.join(POINTS)})")
            if point in {r.point for r in rules}:
                raise InvalidArgument(f"faults: point {point!r} given twice")
            values = {"after": 0, "times": 1}
            for opt in opts:
                key, eq, raw = opt.partition("=")
                if not eq or key not in values or not raw.isdigit():
                    raise InvalidArgument(f"faults: {opt!r} in {item!r} is not after=N or times=M (N, M whole numbers)")
                values[key] = int(raw)
            if values["times"] < 1:
                raise InvalidArgument(f"faults: times must be at least 1 in {item!r}")
            rules.append(_Rule(point, values["after"], values["times"]))
        return cls(rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def describe(self) -> str:
        return ",".join(f"{r.point}:after={r.after}:times={r.times}" for r in self._rules.values())

    def _fires(self, rule: _Rule) -> bool:
        """Counts one check of ``rule`` (lock held); True when it fails."""
        rule.seen += 1
        return rule.after < rule.seen <= rule.after + rule.times

    def check(self, point: str, where: str = "") -> None:
        rule = self._rules.get(point)
        if rule is None:
            return
        with self._lock:
            fires = self._fires(rule)
            n = rule.seen
        if fires:
            raise fault(point, n, where)

    def chunk(self, count: int) -> ChunkFault | None:
        """For a fill of ``count`` chunks run outside Python (the native engine): counts the checks of
        ``load.read`` and ``load.copy`` that the fill makes up to the first that fails, and returns that
        one; None when none fails (every check counted)."""
        rules = [self._rules[p] for p in CHUNK_STAGES if p in self._rules]
        if not rules:
            return None
        with self._lock:
            for i in range(count):
                for rule in rules:
                    if self._fires(rule):
                        return ChunkFault(i, rule.point, rule.seen)
        return None


def fault(point: str, n: int, where: str = "") -> InjectedFault:
    at = f" ({where})" if where else ""
    return InjectedFault(f"injected fault at {point}, check {n}{at}", point=point, check=n)


_plan = FaultPlan()


def install(plan: FaultPlan) -> None:
    """Makes ``plan`` the daemon's (the wiring does, once, from the config)."""
    global _plan
    _plan = plan


def current() -> FaultPlan:
    return _plan


def hit(point: str, where: str = "") -> None:
    """Raises InjectedFault when the plan fails this check of ``point``; nothing otherwise."""
    if _plan._rules:  # one attribute test when no plan is set (the default)
        _plan.check(point, where)


@contextmanager
def active(plan: FaultPlan | str) -> Iterator[FaultPlan]:
    """``plan`` installed for the block (unit tests); the one before it afterwards."""
    before = _plan
    installed = FaultPlan.parse(plan) if isinstance(plan, str) else plan
    install(installed)
    try:
        yield installed
    finally:
        install(before)
