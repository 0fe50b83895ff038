"""Where loads may read from: the configured model roots.

A path is judged by its real path (every link resolved), so a link inside a root that leads out of
it is refused, and so is a path that only looks inside one (``/models/../etc``). No roots: every
path is allowed (the daemon says so when it starts).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from hotweights.errors import OutsideModelRoots, shorten


class ModelRoots:
    def __init__(self, roots: Iterable[str] = ()) -> None:
        self.roots = tuple(os.path.realpath(r) for r in roots)

    @property
    def confined(self) -> bool:
        return bool(self.roots)

    def contains(self, real: str) -> bool:
        return not self.roots or any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots)

    def check(self, given: str, real: str) -> None:
        """Raises OutsideModelRoots unless ``real`` (the real path of ``given``) is inside a root."""
        if self.contains(real):
            return
        leads = "" if os.path.abspath(given) == real else f" (it leads to {shorten(real)})"
        raise OutsideModelRoots(
            f"{shorten(given)} is outside the model roots{leads}; loads may read only under "
            f"{', '.join(self.roots)} (model_roots)",
            path=shorten(given),
            real=shorten(real),
            roots=list(self.roots),
        )
