"""Memory backends. ``create_backend`` picks one; the cuda backend is imported only when asked for."""

from __future__ import annotations

from hotweights.errors import InvalidArgument
from hotweightsd.core.backend import MemoryBackend
from hotweightsd.loaders.settings import LoaderSettings


def cuda_available() -> bool:
    try:
        from hotweights.cuda import devices as cuda_driver
    except ImportError:
        return False
    return cuda_driver.device_count() > 0


def create_backend(
    kind: str, *, reserve: int, memory_limit: int | None = None, loader: LoaderSettings | None = None
) -> MemoryBackend:
    loader = loader or LoaderSettings()
    if kind == "auto":
        kind = "cuda" if cuda_available() else "cpu"
    if kind == "cpu":
        from hotweightsd.backends.cpu import CpuBackend

        return CpuBackend(memory_limit=memory_limit, reserve=reserve, threads=loader.threads)
    if kind == "cuda":
        from hotweightsd.backends.cuda import CudaBackend

        return CudaBackend(reserve=reserve, memory_limit=memory_limit, loader=loader)
    raise InvalidArgument(f"unknown backend {kind!r} (choose auto, cpu or cuda)")
