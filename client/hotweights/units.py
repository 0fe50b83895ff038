"""Human byte sizes: "5GB", "141 GB", "512MiB", "1.5T", or a plain number of bytes."""

from __future__ import annotations

import re

from hotweights.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return int(text)
    m = _RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgument(f"cannot read {text!r} as a size (examples: 5GB, 512MiB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"
