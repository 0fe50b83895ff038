"""A rank's tensor table held as columns, and the zero-copy tensors built from it over mapped regions.

Building the tensors is most of an attach for ranks of thousands of tensors, and reading one protobuf
message per tensor was half of that; the daemon sends the table column by column (``TensorTable``),
each column decoded in one call, and the build loop touches only plain lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

import torch

from hotweights import errors


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # safetensors dtype
    served_dtype: str  # torch dtype of the tensor handed out (uint8 where torch lacks ``dtype``)
    shape: tuple[int, ...]
    allocation: int
    offset: int
    nbytes: int


class Table:
    """Column i of every list describes tensor i."""

    __slots__ = ("names", "dtypes", "served", "allocations", "offsets", "nbytes", "shapes")

    def __init__(
        self,
        names: list[str],
        dtypes: list[str],
        served: list[str],
        allocations: list[int],
        offsets: list[int],
        nbytes: list[int],
        shapes: list[tuple[int, ...]],
    ) -> None:
        n = len(names)
        if not all(len(c) == n for c in (dtypes, served, allocations, offsets, nbytes, shapes)):
            raise errors.Internal(f"tensor table columns differ in length (names: {n})")
        self.names, self.dtypes, self.served = names, dtypes, served
        self.allocations, self.offsets, self.nbytes, self.shapes = allocations, offsets, nbytes, shapes

    @classmethod
    def from_pb(cls, t) -> Table:
        """From a ``TensorTable`` message."""
        ndim, dims = list(t.ndim), list(t.dims)
        if sum(ndim) != len(dims):
            raise errors.Internal(f"tensor table: ndim adds up to {sum(ndim)} but {len(dims)} dims were sent")
        ends = list(accumulate(ndim))
        shapes = [tuple(dims[e - k : e]) for k, e in zip(ndim, ends)]
        return cls(
            list(t.name),
            list(t.dtype),
            list(t.served_dtype),
            list(t.allocation),
            list(t.offset),
            list(t.nbytes),
            shapes,
        )

    @classmethod
    def from_rows(cls, rows: Iterable) -> Table:
        """From TensorInfo messages or TensorMeta (the same field names)."""
        rows = list(rows)
        return cls(
            [r.name for r in rows],
            [r.dtype for r in rows],
            [r.served_dtype for r in rows],
            [r.allocation for r in rows],
            [r.offset for r in rows],
            [r.nbytes for r in rows],
            [tuple(r.shape) for r in rows],
        )

    def __len__(self) -> int:
        return len(self.names)

    def meta(self) -> dict[str, TensorMeta]:
        return {
            name: TensorMeta(name, *rest)
            for name, *rest in zip(
                self.names, self.dtypes, self.served, self.shapes, self.allocations, self.offsets, self.nbytes
            )
        }


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def build_tensors(table: Table, bases: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over typed views of the mapped regions, one per table entry.

    Creating a tensor costs about three times as much as a call that returns many at once
    (``unbind``), and a transformer's rank repeats each weight's shape once per layer at a fixed
    distance. So tensors of one (allocation, dtype, shape) whose offsets step evenly, possibly as a
    few interleaved series (q_proj and o_proj share a shape), come from one strided view each;
    anything else gets its own ``as_strided``. Either way each tensor's storage offset, shape and
    strides are the same.
    """
    groups: dict[tuple[int, str, tuple[int, ...]], list[int]] = {}
    for i, key in enumerate(zip(table.allocations, table.served, table.shapes)):
        g = groups.get(key)
        if g is None:
            groups[key] = [i]
        else:
            g.append(i)
    typed: dict[tuple[int, str], tuple[torch.Tensor | None, int]] = {}
    names, offsets, dtypes = table.names, table.offsets, table.dtypes
    out: dict[str, torch.Tensor] = {}
    for (alloc, served, shape), idx in groups.items():
        view = typed.get((alloc, served))
        if view is None:
            view = typed[(alloc, served)] = _typed_view(bases[alloc], served)
        tensor, size = view
        if (
            tensor is None
            or any(offsets[i] % size for i in idx)
            or (size == 1 and served == "uint8" and any(dtypes[i] != "U8" for i in idx))
        ):
            for i in idx:
                out[names[i]] = _slow_view(bases[alloc], offsets[i], table.nbytes[i], shape, served, dtypes[i])
            continue
        st = _contiguous_strides(shape)
        idx.sort(key=offsets.__getitem__)
        elems = [offsets[i] // size for i in idx]
        lo, hi, series = _stacked_span(elems)
        for i, e in zip(idx[:lo] + idx[hi:], elems[:lo] + elems[hi:]):
            out[names[i]] = tensor.as_strided(shape, st, e)
        if series:
            step = elems[lo + series] - elems[lo]
            for j in range(series):
                members = idx[lo + j : hi : series]
                stacked = tensor.as_strided((len(members),) + shape, (step,) + st, elems[lo + j])
                out.update(zip([names[i] for i in members], stacked.unbind(0)))
    return out


def _stacked_span(elems: list[int]) -> tuple[int, int, int]:
    """(lo, hi, k): elems[lo:hi] are k interleaved series with one common step; k == 0 when none is.

    One stray tensor at either end (a final norm beside the layers' norms) is left out of the span.
    """
    n = len(elems)
    for lo, hi in ((0, n), (1, n), (0, n - 1)):
        k = _series(elems[lo:hi])
        if k:
            return lo, hi, k
    return 0, 0, 0


def _series(elems: list[int], most: int = 4) -> int:
    """k when the sorted offsets are k interleaved series with one common step (k <= most), else 0."""
    n = len(elems)
    if n < 4:
        return 0
    for k in range(1, most + 1):
        if n % k or n // k < 2:
            continue
        step = elems[k] - elems[0]
        if all(b - a == step for a, b in zip(elems, elems[k:])):
            return k
    return 0


def _typed_view(base: torch.Tensor, served: str) -> tuple[torch.Tensor | None, int]:
    dtype = getattr(torch, served, None)
    if not isinstance(dtype, torch.dtype) or base.numel() % dtype.itemsize:
        return None, 1
    return base.view(dtype), dtype.itemsize


def _slow_view(
    base: torch.Tensor, offset: int, nbytes: int, shape: tuple[int, ...], served: str, dtype_name: str
) -> torch.Tensor:
    raw = base[offset : offset + nbytes]
    dtype = getattr(torch, served, None)
    if not isinstance(dtype, torch.dtype) or (dtype == torch.uint8 and dtype_name != "U8"):
        return raw  # bytes of a dtype this torch lacks; the table's dtype says how to read them
    return raw.view(dtype).view(shape)
