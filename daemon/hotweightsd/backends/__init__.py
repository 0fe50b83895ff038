"""Memory backends. ``create_backend`` picks one; the cuda backend is imported only when asked for."""

from __future__ import annotations

from hotweights.errors import InvalidArgument
from hotweightsd.core.backend import MemoryBackend


def cuda_available() -> bool:
    try:
        from hotweightsd.backends import cuda_driver
    except ImportError:
        return False
    return cuda_driver.device_count() > 0


def create_backend(kind: str, **options) -> MemoryBackend:
    if kind == "auto":
        kind = "cuda" if cuda_available() else "cpu"
    if kind == "cpu":
        from hotweightsd.backends.cpu import CpuBackend

        return CpuBackend(memory_limit=options.get("memory_limit"), reserve=options.get("reserve", 0),
                          threads=options.get("threads"))
    if kind == "cuda":
        from hotweightsd.backends.cuda import CudaBackend

        return CudaBackend(**options)
    raise InvalidArgument(f"unknown backend {kind!r} (choose auto, cpu or cuda)")
