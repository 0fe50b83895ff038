"""The state file kept beside systemd's fd store: what a restarted daemon needs (registry, tensor
tables, aliases) to serve the fds it gets back without rereading storage.

The body is whatever dict the daemon builds. This module guarantees one thing: ``load`` returns
exactly the body ``save`` wrote (as JSON: tuples come back as lists, keys as strings), or raises
DataLoss naming the file and the problem, so a torn or edited file is never served from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hotweights.errors import ChecksumMismatch, DataLoss, Internal, InvalidArgument

FORMAT = "hotweights-state"
VERSION = 1


def _canonical(body: dict) -> bytes:
    # The checksum covers this re-serialization, not the file's bytes, so the file itself can stay
    # indented for people reading it.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def save(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Writes ``doc`` atomically: readers see the old file or the new one, never a torn one, also
    across a crash or power loss (temp file in the same directory, fsync, rename, fsync dir)."""
    path = Path(path)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"state for {path} must be a dict, not {type(doc).__name__}")
    try:
        body = _canonical(doc)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"state for {path} cannot be written as JSON: {exc}") from exc
    envelope = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(), "body": doc}
    data = json.dumps(envelope, sort_keys=True, indent=1, ensure_ascii=False).encode() + b"\n"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise Internal(f"cannot write state file {path}: {exc}", path=str(path)) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _lost(path: Path, problem: str, text: str) -> DataLoss:
    return DataLoss(f"state file {path} {text}", path=str(path), problem=problem)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The body ``save`` wrote. Raises DataLoss (``details['problem']`` says which) when the file
    is missing, unreadable, not JSON, not a hotweights state file, of another format version, or
    corrupted (ChecksumMismatch)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _lost(path, "missing", "is missing") from None
    except OSError as exc:
        raise _lost(path, "unreadable", f"cannot be read: {exc}") from exc
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _lost(path, "not-json", f"is not valid JSON ({exc}): it is truncated or corrupted") from exc
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        found = envelope.get("format") if isinstance(envelope, dict) else type(envelope).__name__
        raise _lost(path, "not-state", f"is not a hotweights state file (format {found!r}, expected {FORMAT!r})")
    if envelope.get("version") != VERSION:
        raise _lost(
            path, "version", f"has format version {envelope.get('version')!r}; this daemon reads version {VERSION}"
        )
    body, recorded = envelope.get("body"), envelope.get("sha256")
    if not isinstance(body, dict) or not isinstance(recorded, str):
        raise _lost(path, "corrupted", "is corrupted: its body or checksum is missing")
    actual = hashlib.sha256(_canonical(body)).hexdigest()
    if actual != recorded:
        raise ChecksumMismatch(
            f"state file {path} is corrupted: the sha256 of its body is {actual}, the file records {recorded}",
            path=str(path),
            problem="checksum",
        )
    return body


class FdMismatch(NamedTuple):
    """How the fds handed back by the service manager differ from what the state file expects."""

    missing: frozenset[str]  # in the state file, but no fd came back
    unexpected: frozenset[str]  # an fd came back that the state file does not name
    miscounted: dict[str, tuple[int, int]]  # name -> (fds expected, fds received)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.miscounted)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} name(s) in the state file got no fd back: {_some(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} fd name(s) are not in the state file: {_some(self.unexpected)}")
        for name, (want, got) in sorted(self.miscounted.items()):
            parts.append(f"{name!r} came back with {got} fd(s), the state file expects {want}")
        return "; ".join(parts) or "fds match the state file"


def _some(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def match_fds(expected: Mapping[str, int] | Iterable[str], received: Mapping[str, Sequence[int]]) -> FdMismatch:
    """Compares the fd names (and, given a mapping, fd counts) the state file expects with the fds
    ``listen_fds`` returned. Pure: it neither closes nor validates the fds themselves."""
    counts = dict(expected) if isinstance(expected, Mapping) else None
    want = set(counts) if counts is not None else set(expected)
    have = {name for name, fds in received.items() if fds}
    miscounted = {}
    if counts is not None:
        miscounted = {n: (counts[n], len(received[n])) for n in want & have if counts[n] != len(received[n])}
    return FdMismatch(frozenset(want - have), frozenset(have - want), miscounted)
