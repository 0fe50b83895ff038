"""The load path, chosen once when the backend starts: GDS or the bounce ring, and on the bounce
path the read mode, the engine and the ring's shape. Fills read the choice; none re-decides it.

Why each default is what it is (the measurements) is in docs/loader.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotweights.errors import BackendError
from hotweightsd.loaders import gds, native
from hotweightsd.loaders.scheduler import SPARE_CORES
from hotweightsd.loaders.settings import LoaderSettings

MiB = 1024 * 1024
DEFAULT_CHUNK = 4 * MiB
DEFAULT_DIRECT_REQUEST = MiB
DEFAULT_DIRECT_CHUNK = MiB // 2
DEFAULT_BUSY_CHUNK = 16 * MiB
DEFAULT_DEPTH = 2
MAX_DEFAULT_THREADS = 16
MIN_DEFAULT_THREADS = 4


def default_threads(cores: int) -> int:
    return max(MIN_DEFAULT_THREADS, min(MAX_DEFAULT_THREADS, cores - SPARE_CORES))


def size_text(n: int) -> str:
    return f"{n // MiB}MiB" if n % MiB == 0 else f"{n // 1024}KiB"


@dataclass(frozen=True)
class LoadPath:
    source: str  # "bounce" | "gds"
    source_why: str  # why that source, as the load's description ends with it
    gds_compat: bool  # cuFile forced into compatibility mode (a correctness check of the GDS path)
    read_mode: str  # "auto" (each file's ranges by page-cache residency, when a fill opens it) | "pread" | "odirect"
    read_order: str  # "file" | "streams" (each reader through its own contiguous share; plan.streams)
    engine: str  # "native" | "python"
    engine_why: str  # why the python workers run ("" on the native engine)
    threads: int  # readers per ring
    depth: int  # slots per reader
    chunk_size: int  # bytes per read (the plan's grid)
    busy_chunk: int  # the python workers' read while other fills run; == chunk_size: no runs
    native_lib: str  # "" = the library built beside the package
    direct_request: int = 0  # the native engine's most bytes per pread of an O_DIRECT read; 0: a whole chunk
    direct_chunk: int = 0  # the native engine's O_DIRECT reads on this grid (a divisor of chunk_size); 0: chunk_size's
    ring_memory: str = "driver"  # "driver" (cuMemHostAlloc) | "huge" (huge pages registered with the driver)

    @property
    def slot_size(self) -> int:
        """A slot holds one read: one chunk on the native engine, a run of chunks on the python workers."""
        return self.chunk_size if self.engine == "native" else max(self.chunk_size, self.busy_chunk)

    def describe(self, threads: int | None = None) -> str:
        """The bounce ring as a load's description reports it; ``threads`` is what ran when the share cut it."""
        extra = ""
        if self.engine == "python" and self.busy_chunk > self.chunk_size:
            extra = f" ({size_text(self.busy_chunk)} while other fills run)"
        if self.engine == "native":
            extra += ", native engine"
            if self.read_mode == "pread":  # reads nothing O_DIRECT
                pass
            elif self.direct_chunk:
                extra += f" (O_DIRECT in {size_text(self.direct_chunk)} reads)"
            elif self.direct_request:
                extra += f" (O_DIRECT in {size_text(self.direct_request)} requests)"
        if threads is not None and threads != self.threads:
            extra += f" (ring of {self.threads}: fills ran at once)"
        ring = f"{threads or self.threads} threads x {self.depth} x {size_text(self.chunk_size)}"
        return f"{self.read_mode} ring {ring}{extra}"

    @property
    def note(self) -> str:
        """One line for the daemon's status: the path every load takes, and why."""
        if self.source == "gds":
            return self.source_why
        engine = f"; {self.engine_why}" if self.engine_why else ""
        order = f", {self.read_order} order" if self.read_order != "file" else ""
        memory = ", huge-page ring" if self.ring_memory == "huge" else ", cuMemHostAlloc ring"
        return f"bounce path ({self.describe()}{order}{memory}{engine}): {self.source_why}"


def choose(settings: LoaderSettings, *, cores: int, real_driver: bool) -> LoadPath:
    """The path for every load of a backend. ``real_driver``: cuda-bindings' driver, not a test double
    (the native engine calls the driver library itself). Raises BackendError where the settings demand
    what cannot run here (gds=on or compat without cuFile, engine=native without the library)."""
    source, source_why = _source(settings.gds)
    read_mode = settings.read_mode
    engine, engine_why = _engine(settings, real_driver)
    chunk = settings.chunk_size or DEFAULT_CHUNK
    busy = settings.busy_chunk_size or DEFAULT_BUSY_CHUNK
    return LoadPath(
        source=source,
        source_why=source_why,
        gds_compat=settings.gds == "compat",
        read_mode=read_mode,
        read_order=settings.read_order,
        engine=engine,
        engine_why=engine_why,
        threads=settings.threads or default_threads(cores),
        depth=settings.ring_depth or DEFAULT_DEPTH,
        chunk_size=chunk,
        busy_chunk=max(chunk, busy // chunk * chunk),  # whole grid windows
        native_lib=settings.native_lib,
        direct_request=_direct_request(settings.direct_read_size or DEFAULT_DIRECT_REQUEST, chunk, engine),
        direct_chunk=_direct_chunk(settings.direct_chunk_size or DEFAULT_DIRECT_CHUNK, chunk, engine),
        ring_memory=settings.ring_memory,
    )


def _direct_request(size: int, chunk: int, engine: str) -> int:
    """0 where a request would hold the whole chunk anyway, and on the python workers (whole chunks)."""
    return size if engine == "native" and size < chunk else 0


def _direct_chunk(size: int, chunk: int, engine: str) -> int:
    """0 where cold reads keep the chunk grid: a size of a chunk or more, one that does not divide it (a
    piece would leave its window), and the python workers (whole chunks, merged into runs)."""
    return size if engine == "native" and size < chunk and chunk % size == 0 else 0


def _source(mode: str) -> tuple[str, str]:
    if mode == "off":
        return "bounce", "GDS off by configuration"
    if mode == "compat":
        reason = gds.library_reason()
        if reason:
            raise BackendError("gds", "unavailable", f"GDS compatibility mode was asked for, but {reason}")
        return "gds", "GDS compatibility mode forced by configuration"
    reason = gds.unavailable_reason()
    if reason is None:
        return "gds", "GDS: " + ", ".join(gds.nvidia_fs_devices())
    if mode in ("on", "force"):
        raise BackendError("gds", "unavailable", f"GDS was required (gds=on), but {reason}")
    return "bounce", reason


def _engine(settings: LoaderSettings, real_driver: bool) -> tuple[str, str]:
    if settings.engine == "python":
        return "python", "python workers by configuration"
    reason = native.unavailable_reason(settings.native_lib) if real_driver else "not the CUDA driver (a test double)"
    if reason is None:
        return "native", ""
    if settings.engine == "native":
        raise BackendError("native loader", "unavailable", f"the native loader engine was asked for, but {reason}")
    return "python", f"python workers: {reason}"
