"""Output files laid out before any data exists, then filled by positioned writes.

Every output tensor's size is known from the plan, so each part's safetensors header is written
first and tensors land at their final offsets with ``pwrite`` from several threads at once, in
whatever order the source is read. Memory then holds only the tensors in flight, never a whole
part, and space is reserved up front (``posix_fallocate``) so a full disk fails in seconds, not at
the end of an hour of copying.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotweights.errors import InvalidArgument, ResourceExhausted
from hotweights.format.dtypes import DTYPES
from hotweights.tools.shard.placement import OutTensor

ALIGN = 8  # safetensors pads its header so tensor data starts 8-byte aligned
_WRITE_CHUNK = 1 << 30  # one pwrite call is capped near 2 GiB on Linux


def shard_file_name(rank: int, part: int) -> str:
    return f"model-rank-{rank}-part-{part}.safetensors"


@dataclass
class Part:
    rank: int
    index: int
    tensors: list[OutTensor] = field(default_factory=list)
    header: bytes = b""

    @property
    def name(self) -> str:
        return shard_file_name(self.rank, self.index)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return 8 + len(self.header) + self.data_bytes


def layout_parts(
    outputs: list[OutTensor], rank: int, *, parts: int | None = None, max_part_bytes: int | None = None
) -> list[Part]:
    """Group one rank's tensors into parts (in plan order) and fix every tensor's offset."""
    if not outputs:
        raise InvalidArgument(f"rank {rank} has no tensors to write", rank=rank)
    groups: list[list[OutTensor]]
    if parts is not None:
        if parts < 1:
            raise InvalidArgument(f"--parts-per-rank must be at least 1, not {parts}")
        if parts > len(outputs):
            raise InvalidArgument(
                f"--parts-per-rank {parts} exceeds the {len(outputs)} tensors of rank {rank}", rank=rank
            )
        groups = _even_groups(outputs, parts)
    else:
        limit = max_part_bytes or 0
        if limit <= 0:
            raise InvalidArgument(f"--max-part-size must be positive, not {max_part_bytes}")
        groups = [[]]
        size = 0
        for t in outputs:
            if groups[-1] and size + t.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
    return [_finish(Part(rank, i, g)) for i, g in enumerate(groups)]


def _even_groups(outputs: list[OutTensor], n: int) -> list[list[OutTensor]]:
    """n contiguous groups of about equal bytes, none empty."""
    total = sum(t.nbytes for t in outputs)
    groups: list[list[OutTensor]] = [[] for _ in range(n)]
    acc = 0
    g = 0
    for i, t in enumerate(outputs):
        remaining_tensors = len(outputs) - i
        remaining_groups = n - g
        # Move on when this group has its share, or when the rest of the groups need the rest of the tensors.
        if groups[g] and g < n - 1 and (acc >= total * (g + 1) / n or remaining_tensors < remaining_groups):
            g += 1
        groups[g].append(t)
        acc += t.nbytes
    return groups


def _finish(part: Part) -> Part:
    # Widest dtypes first: every tensor then starts at a multiple of its element size (the data section
    # has no gaps, so alignment can only come from the order).
    part.tensors.sort(key=lambda t: -max(DTYPES[t.dtype].bits // 8, 1))
    offset = 0
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for t in part.tensors:
        t.file = part.name
        t.begin = offset
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    part.header = raw
    return part


class PartFile:
    """One output file, created (space reserved, header written) up front; ``write`` is safe from several
    threads (disjoint ranges).

    No descriptor is held between writes: each write opens the file for itself, so a run of thousands of
    parts holds at most one descriptor per write in flight, never one per part (which ran into the
    per-process limit, EMFILE, after the whole plan).
    """

    def __init__(self, directory: Path, part: Part) -> None:
        self.path = directory / part.name
        self.part = part
        self.data_start = 8 + len(part.header)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _reserve(fd, part.size, self.path)
            _pwrite_all(fd, len(part.header).to_bytes(8, "little") + part.header, 0, self.path)
        finally:
            os.close(fd)

    def write(self, tensor: OutTensor, data: torch.Tensor) -> None:
        raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes != tensor.nbytes:
            raise AssertionError(f"{tensor.name}: {raw.nbytes} bytes for a {tensor.nbytes}-byte slot")
        view = memoryview(raw)  # type: ignore[arg-type]
        fd = _open_for_write(self.path)
        try:
            _pwrite_all(fd, view, self.data_start + tensor.begin, self.path)
        finally:
            os.close(fd)

    def close(self, sync: bool = True) -> None:
        """Makes the file durable (``sync``); nothing to release otherwise."""
        if not sync:
            return
        fd = _open_for_write(self.path)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _as_error(exc, self.path) from None
        finally:
            os.close(fd)


def _open_for_write(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _as_error(exc, path) from None


def _reserve(fd: int, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            os.ftruncate(fd, size)  # a filesystem without fallocate: space is found out while writing
            return
        raise _as_error(exc, path) from None


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = _pwrite(fd, view[done : done + _WRITE_CHUNK], offset + done)
        except OSError as exc:
            raise _as_error(exc, path) from None
        if n <= 0:
            raise _as_error(OSError(errno.EIO, "short write"), path)
        done += n


def _as_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(
            f"no space left on the device writing {path.name} ({exc.strerror}); the run "
            f"was abandoned and its partial output removed",
            path=str(path),
        )
    return OSError(exc.errno, f"writing {path}: {exc.strerror}")


# The one place bytes reach the disk; tests replace it to simulate a full disk.
_pwrite = os.pwrite
