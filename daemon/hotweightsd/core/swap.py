"""Swapping an alias to a new version: side by side when memory allows, or by draining the old one."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from hotweights.errors import InsufficientMemory, InvalidArgument, NotFound, shorten
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, State, check_name, split_ref


class SwapMode(str, Enum):
    SIDE_BY_SIDE = "side-by-side"
    DRAIN = "drain"


@dataclass
class SwapPlan:
    version: ModelVersion
    run: Callable[[], ModelVersion]


def is_path(target: str) -> bool:
    """A swap target is a checkpoint path (absolute, or existing) or ``NAME@VERSION``."""
    if "/" in target or os.path.exists(target):
        return True
    if "@" in target:
        return False
    raise InvalidArgument(f"swap target {shorten(target)!r} is neither NAME@VERSION nor a checkpoint path")


def swap(
    m: ModelManager,
    alias: str,
    target: str,
    version: str | None = None,
    mode: SwapMode = SwapMode.SIDE_BY_SIDE,
    drain_timeout: float = 60.0,
    verify: str | None = None,
    name: str | None = None,
) -> SwapPlan:
    """Plans the swap; everything refusable is refused before the alias or memory changes.

    The alias flips only once the new version is READY, so a failed load leaves it where it was.
    The old version is retired: freed when its last lease ends.
    """
    check_name("alias", alias)
    current = m.aliases().get(alias)
    old = m.get(*current.split("@", 1)) if current else None

    if not is_path(target):
        tname, tversion = split_ref(target)
        new = m.get(tname, tversion or "")

        def flip() -> ModelVersion:
            _move(m, alias, new, old)
            return new

        if new.state is not State.READY:
            flip()  # raises the clear FailedPrecondition of set_alias
        return SwapPlan(new, flip)

    model = name or (old.name if old else None)
    if model is None:
        raise NotFound(
            f"alias {alias!r} does not exist yet; pass the model name (--name) for a path target", alias=alias
        )
    if mode is SwapMode.SIDE_BY_SIDE:
        try:
            mv, load = m.begin_load(model, target, version=version, verify=verify)
        except InsufficientMemory as exc:
            raise InsufficientMemory(
                f"{exc.message}; the new version cannot load beside {old.key if old else 'the old one'} "
                f"(retry with --mode drain to free the old version first)",
                **exc.details,
            ) from None

        def run() -> ModelVersion:
            load()
            _move(m, alias, mv, old)
            return mv

        return SwapPlan(mv, run)

    if old is None:
        raise InvalidArgument(f"--mode drain needs an existing alias; {shorten(alias)!r} points at nothing")
    # Fail on a bad checkpoint before anything is drained.
    with m.open_checkpoint(target) as ckpt:
        m.verify(ckpt, verify)
    m.drain(old, drain_timeout)
    mv, load = m.begin_load(model, target, version=version, verify=verify)

    def run_after_drain() -> ModelVersion:
        load()
        _move(m, alias, mv, old)  # the old version is gone already: retiring it is a no-op
        return mv

    return SwapPlan(mv, run_after_drain)


def _move(m: ModelManager, alias: str, new: ModelVersion, old: ModelVersion | None) -> None:
    m.set_alias(alias, new.key)
    if old is not None and old.key != new.key:
        m.retire(old.key)
