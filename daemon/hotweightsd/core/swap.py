"""Swapping an alias to a new version: side by side when memory allows, or by draining the old one."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from hotweights.errors import InsufficientMemory, InvalidArgument, NotFound, Unavailable, shorten
from hotweights.format.engine_layout import check_layout
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.registry import ModelVersion, State, check_name, split_ref


class SwapMode(str, Enum):
    SIDE_BY_SIDE = "side-by-side"
    DRAIN = "drain"


@dataclass
class SwapPlan:
    version: ModelVersion
    run: Callable[[], ModelVersion]
    # What became of the version the alias moved away from; set by ``run``.
    note: str = ""
    # Nothing is read: the target is a loaded NAME@VERSION, or a path whose version is loaded (or
    # loading) from the same content already.
    already_loaded: bool = False


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
    create: bool = False,
    keep_previous: bool | None = None,
    layout: str = "",
) -> SwapPlan:
    """Plans the swap; everything refusable is refused before the alias or memory changes.

    The alias must exist unless ``create``: a typo is NotFound naming the known aliases, before
    anything is read. It flips only once the new version is READY, so a failed load leaves it where
    it was. The old version is kept resident for a rollback (``keep_previous``; None: the daemon's
    setting, when memory allows) or retired: freed when its last lease ends. ``layout``: the engine
    layout a target path is loaded in (as ``load``'s); "" keeps the layout of the version the alias
    names, "none" asks for the checkpoint's own.
    """
    check_name("alias", alias)
    asked = layout
    layout = check_layout(layout)
    current = m.aliases().get(alias) if create else m.require_alias(alias)
    old = m.find(current) if current else None
    # An alias naming nothing: a drain swap freed its version and failed to load the next (this swap
    # mends it), or one is loading the next right now (two swaps would race for the alias).
    failed = m.drain_swap_failure(alias) if current and old is None else None
    if current and old is None and failed is None:
        raise Unavailable(
            f"alias {shorten(alias)!r} is between versions: a drain swap is loading its next version; "
            "swap it again once that has finished",
            alias=alias,
        )

    if not is_path(target):
        if asked:
            raise InvalidArgument(
                f"a layout applies to a checkpoint path; {target!r} names a loaded version (it keeps its own layout)"
            )
        tname, tversion = split_ref(target)
        new = m.get(tname, tversion or "")
        plan = SwapPlan(new, lambda: new, already_loaded=True)

        def flip() -> ModelVersion:
            plan.note = _move(m, alias, new, old, keep_previous, create)
            return new

        plan.run = flip
        if new.state is not State.READY:
            flip()  # raises the clear FailedPrecondition of set_alias
        return plan

    # The engine serving the alias binds the same layout after the swap, unless told otherwise.
    kept_from = old if not asked and old is not None and old.layout else None
    if kept_from is not None:
        layout = kept_from.layout
    elif failed is not None and not asked:
        layout = failed.layout  # the layout of the version the failed drain swap freed
    model = name or (old.name if old else current.partition("@")[0] if current else None)
    if model is None:
        raise NotFound(
            f"alias {alias!r} does not exist yet; pass the model name (--name) for a path target", alias=alias
        )
    if mode is SwapMode.DRAIN and failed is not None:
        mode = SwapMode.SIDE_BY_SIDE  # nothing left to drain: the alias's version went with a failed drain swap
    if mode is SwapMode.SIDE_BY_SIDE:
        if kept_from is not None:
            _check_target(m, target, layout, alias, kept_from)
        try:
            start = m.start_load(model, target, version=version, verify=verify, layout=layout)
        except InsufficientMemory as exc:
            raise InsufficientMemory(
                f"{exc.message}; the new version cannot load beside {old.key if old else 'the old one'} "
                f"(retry with --mode drain to free the old version first)",
                **exc.details,
            ) from None

        mv = start.version
        side = SwapPlan(mv, lambda: mv, already_loaded=start.already_loaded)

        def run() -> ModelVersion:
            start.run()
            side.note = _move(m, alias, mv, old, keep_previous, create)
            return mv

        side.run = run
        return side

    if old is None:
        raise InvalidArgument(f"--mode drain needs an existing alias; {shorten(alias)!r} points at nothing")
    if keep_previous:
        raise InvalidArgument(
            "--keep-previous and --mode drain exclude each other: a drain frees the previous version first"
        )
    m.check_drainable(old.key, alias)  # before the target is verified; drain checks again under its lock
    _check_target(m, target, layout, alias, kept_from, verify=verify, drain=True)
    m.drain_swap_begins(alias)
    m.drain(old, drain_timeout, alias)
    # A drain is for want of memory: a version kept for this alias's rollback goes too, once the drain
    # has happened (a drain that times out leaves the rollback as it was).
    released = m.release_kept(alias)
    try:
        start = m.start_load(model, target, version=version, verify=verify, layout=layout)
    except BaseException as exc:
        m.drain_swap_failed(alias, old, exc)
        raise
    mv = start.version
    joins = mv.joins  # this swap's own load counted: a load joining from here on claims the version too

    def run_after_drain() -> ModelVersion:
        # A rollback's spare that this swap's load takes back is this swap's to retire again, if the
        # alias moved meanwhile (the load took it out of retirement); another version found resident is not.
        revived = start.already_loaded and m.is_spare(mv)
        try:
            start.run()
            # The plan saw the alias name ``old`` long ago: a SetAlias (or load --alias) answered while
            # this loaded must not be silently undone, so the move is a compare-and-set (the old version
            # is gone already). A failure is recorded on the alias only where it still names ``old``.
            m.move_alias_from(
                alias, mv.key, old.key, create=create, loaded_here=revived or not start.already_loaded, joins=joins
            )
        except BaseException as exc:
            m.drain_swap_failed(alias, old, exc)
            raise
        return mv

    also = f" and {', '.join(released)}, kept for a rollback" if released else ""
    return SwapPlan(
        mv, run_after_drain, note=f"freed {old.key}{also} before loading (drain)", already_loaded=start.already_loaded
    )


def _check_target(
    m: ModelManager,
    target: str,
    layout: str,
    alias: str,
    kept_from: ModelVersion | None,
    verify: str | None = None,
    drain: bool = False,
) -> None:
    """Refuses a checkpoint ``layout`` does not fit, saying so where the layout is the one ``kept_from``
    (the version the alias names) has; for a drain, one the verify level refuses too: before anything
    is drained."""
    with m.open_checkpoint(target) as ckpt:
        try:
            m.layout_recipes(ckpt, layout)
        except InvalidArgument as exc:
            if kept_from is None:
                raise
            raise InvalidArgument(
                f"{exc.message} (layout {layout} is the layout of {kept_from.key}, which {alias!r} names; "
                f"--layout none loads the files' own)",
                **exc.details,
            ) from None
        if drain:
            m.verify(ckpt, verify)


def _move(
    m: ModelManager, alias: str, new: ModelVersion, old: ModelVersion | None, keep: bool | None, create: bool
) -> str:
    why_not = ""
    if keep is None:
        keep, why_not = m.keep_allowed(new) if old is not None and old.key != new.key else (False, "")
    return m.move_alias(alias, new.key, keep=keep, why_not=why_not, create=create)
