"""Mapping one exported allocation into this process as a flat uint8 tensor, without a copy.

A region's memory stays mapped while any tensor built on ``base`` is alive: releasing a lease
never pulls memory out from under a tensor the serving code still holds.
"""

from __future__ import annotations

import mmap
import warnings
from typing import Protocol

import torch

from hotweights.errors import InvalidArgument


class Region(Protocol):
    size: int
    base: torch.Tensor  # uint8, one element per byte of the allocation, on the allocation's device

    def close(self) -> None:
        """Drops this object's references; the mapping ends once no tensor uses it."""


class HostRegion:
    """A memfd mapped read-only and shared: the daemon's pages, not a copy."""

    def __init__(self, size: int, fd: int) -> None:
        self.size = size
        self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        with warnings.catch_warnings():
            # The buffer is read-only on purpose (sealed memfd); torch warns that it cannot write it.
            warnings.simplefilter("ignore", UserWarning)
            self.base = torch.frombuffer(self._map, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)

    @property
    def address(self) -> int:
        return self.base.data_ptr()

    def close(self) -> None:
        # Never mmap.close() here: torch.frombuffer keeps a reference to the mmap object but no buffer
        # export, so closing would unmap pages under live tensors. The mapping ends when the last
        # tensor (and so the mmap object) is collected.
        self.base = torch.empty(0, dtype=torch.uint8)
        self._map = None


def open_region(
    handle_type: str, size: int, device: int, fd: int | None, ipc_handle: bytes = b"", device_bus_id: str = ""
) -> Region:
    """Maps one allocation. Takes no ownership of ``fd``: the caller closes it after this returns."""
    if handle_type == "MEMFD":
        if fd is None:
            raise InvalidArgument("a MEMFD allocation arrived without its file descriptor")
        return HostRegion(size, fd)
    if handle_type in ("CUDA_VMM_FD", "CUDA_IPC"):
        from hotweights.cuda import driver as cuda_import

        return cuda_import.open_region(handle_type, size, device, fd, ipc_handle, device_bus_id)
    raise InvalidArgument(f"unknown handle type {handle_type!r}")
