"""``hotweights shard``: a Hugging Face checkpoint in, per-rank safetensors parts and a manifest out.

The run is all-or-nothing as seen from the output path: everything is written into a hidden
staging directory beside it, every file fsynced, and renamed into place at the very end (one
``rename``, atomic on a POSIX filesystem), so a failed run never leaves a half checkpoint under the
name a loader would open. A failure, Ctrl-C or SIGTERM removes the staging directory; only SIGKILL
(or a crash) can leave a ``.NAME.hotweights-partial-*`` directory behind. The output path must not be
a symbolic link (refused before any work: ``rename`` would not follow it), and a plan of more part
files than the daemon opens by default is refused before anything is written.

Memory stays bounded by the tensors in flight: each job reads one source tensor, quantizes it if
asked, and writes its pieces to every rank's file; several jobs run at once (all ranks' files fill
together) under a byte budget.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

import hotweights
from hotweights.errors import (
    BadCheckpoint,
    InvalidArgument,
    NotFound,
)
from hotweights.format.checkpoint import INDEX_NAME, MANIFEST_NAME, SERVING_FILES, open_checkpoint
from hotweights.format.dtypes import DTYPES, torch_dtype
from hotweights.format.manifest import FORMAT, FORMAT_VERSION, dumps_manifest, file_xxh64
from hotweights.format.source import DEFAULT_MAX_FILES
from hotweights.staging import check_output, fsync, sigterm_unwinds, staged
from hotweights.tools.shard import quantize as fp8
from hotweights.tools.shard.model_config import CONFIG_NAME, load_config
from hotweights.tools.shard.placement import Job, ShardPlan, SourceTensor, plan_shards
from hotweights.tools.shard.rules import resolve_rules
from hotweights.tools.shard.writer import Part, PartFile, layout_parts

DEFAULT_MAX_PART_BYTES = 5 * 10**9
DEFAULT_MEMORY_BUDGET = 4 << 30
# config.json is rewritten for FP8; the rest are copied verbatim.
AUX_NAMES = SERVING_FILES
AUX_SUFFIXES = (".tiktoken",)


@dataclass
class ShardResult:
    out: Path
    tp: int
    files: list[str]
    bytes_written: int
    seconds: float
    manifest: dict[str, Any]


def shard_checkpoint(
    src: str | Path,
    out: str | Path,
    tp: int,
    *,
    quantize: str | None = None,
    fp8_scale: str = "channel",
    parts_per_rank: int | None = None,
    max_part_size: int | None = None,
    rules_file: str | Path | None = None,
    workers: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> ShardResult:
    """Shard ``src`` for tensor parallelism ``tp`` into the new or empty directory ``out``."""
    started = time.monotonic()
    src = Path(src).expanduser()
    out = Path(out).expanduser()
    if quantize not in (None, "fp8"):
        raise InvalidArgument(f"--quantize takes fp8, not {quantize!r}")
    if parts_per_rank is not None and max_part_size is not None:
        raise InvalidArgument("pass --parts-per-rank or --max-part-size, not both")
    # None is the default; 0 or less is a mistake, not a request for it
    if workers is not None and workers < 1:
        raise InvalidArgument(f"--workers must be at least 1, not {workers}")
    if max_part_size is not None and max_part_size < 1:
        raise InvalidArgument(f"--max-part-size must be at least 1 byte, not {max_part_size}")
    if not src.exists():
        raise NotFound(f"{src}: no such directory", path=str(src))
    if not src.is_dir():
        raise BadCheckpoint(
            f"{src}: not a directory (hotweights shard reads a Hugging Face model directory)", path=str(src)
        )
    src = src.resolve()
    config = load_config(src)
    check_output(src, out, "hotweights shard")
    if (src / MANIFEST_NAME).exists():
        raise InvalidArgument(
            f"{src}: already a hotweights sharded checkpoint; shard the original model", path=str(src)
        )
    with open_checkpoint(src) as ckpt:
        if ckpt.layout == "sharded":
            raise InvalidArgument(
                f"{src}: holds model-rank-*-part-* files, already sharded; shard the original model", path=str(src)
            )
        tensors = [
            SourceTensor(t.name, t.dtype.name, t.shape, f.path, t.begin, t.end)
            for f in ckpt.ranks[0].files
            for t in sorted(f.tensors, key=lambda t: t.begin)
        ]

    plan = plan_shards(tensors, config, tp, resolve_rules(config, rules_file), quantize=fp8_scale if quantize else None)
    parts = [
        p
        for r in range(tp)
        for p in layout_parts(
            plan.rank_outputs(r),
            r,
            parts=parts_per_rank,
            max_part_bytes=None if parts_per_rank else (max_part_size or DEFAULT_MAX_PART_BYTES),
        )
    ]

    if len(parts) > DEFAULT_MAX_FILES:
        raise InvalidArgument(
            f"the plan makes {len(parts)} part files; the daemon opens at most {DEFAULT_MAX_FILES} files of a "
            f"checkpoint by default (max_checkpoint_files): give a larger --max-part-size or fewer --parts-per-rank",
            parts=len(parts),
            limit=DEFAULT_MAX_FILES,
        )

    with sigterm_unwinds():
        return _write_checkpoint(src, out, tp, plan, parts, ckpt.layout, workers, memory_budget, progress, started)


def _write_checkpoint(
    src: Path,
    out: Path,
    tp: int,
    plan: ShardPlan,
    parts: list[Part],
    layout: str,
    workers: int | None,
    memory_budget: int,
    progress: bool,
    started: float,
) -> ShardResult:
    with staged(out, "hotweights") as stage:
        source_hash = _write_parts(plan, parts, stage, workers, memory_budget, progress)
        files = _hash_parts(parts, stage, workers)
        aux = _copy_aux(src, stage, plan)
        doc = manifest_doc(
            plan,
            parts,
            files,
            aux,
            source={
                "name": src.name,
                "path": str(src),
                "layout": layout,
                "hash": f"xxh64:{source_hash}",
                "hash_of": "xxh64 over the sorted lines '<tensor name> <xxh64 of its bytes>' of every source tensor",
            },
        )
        tmp = stage / (MANIFEST_NAME + ".tmp")
        _write_durable(tmp, dumps_manifest(doc).encode())
        os.replace(tmp, stage / MANIFEST_NAME)
    return ShardResult(out, tp, [p.name for p in parts], sum(p.size for p in parts), time.monotonic() - started, doc)


def _write_durable(path: Path, data: bytes) -> None:
    """Writes ``data`` as the new file ``path`` and fsyncs it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class _ByteBudget:
    """Admits jobs while the bytes they hold stay under a limit (one oversized job always runs alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _write_parts(
    plan: ShardPlan, parts: list[Part], staging: Path, workers: int | None, budget: int, show_progress: bool
) -> str:
    """Run every job; return the combined xxh64 of the source tensors."""
    opened: dict[str, PartFile] = {}
    sources: dict[Path, int] = {}
    digests: dict[str, str] = {}
    try:
        for p in parts:
            opened[p.name] = PartFile(staging, p)
        for job in plan.jobs:
            if job.source.file is not None and job.source.file not in sources:
                sources[job.source.file] = os.open(job.source.file, os.O_RDONLY | os.O_CLOEXEC)
        total = sum(j.source.nbytes for j in plan.jobs)
        with _progress(show_progress, total, "sharding") as advance:

            def run(job: Job) -> None:
                digests[job.source.name] = _run_job(job, sources, opened)
                advance(job.source.nbytes)

            _run_all(plan.jobs, run, workers, _ByteBudget(budget))
        for f in opened.values():
            f.close(sync=True)
        opened.clear()
    finally:
        for f in opened.values():
            f.close(sync=False)
        for fd in sources.values():
            os.close(fd)
    h = xxhash.xxh64()
    for name in sorted(digests):
        h.update(f"{name} {digests[name]}\n".encode())
    return h.hexdigest()


def _run_all(jobs: list[Job], run: Callable[[Job], None], workers: int | None, budget: _ByteBudget) -> None:
    workers = workers or min(16, max(4, os.cpu_count() or 1))
    errors: list[BaseException] = []
    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hw-shard") as pool:
        for job in jobs:
            need = job.source.nbytes * (5 if job.quantize else 2)  # source + pieces (+ fp32 temporaries)
            budget.acquire(need)
            if errors:
                budget.release(need)
                break

            def task(job: Job = job, need: int = need) -> None:
                try:
                    run(job)
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    budget.release(need)

            futures.append(pool.submit(task))
        if errors:
            for f in futures:
                f.cancel()
    if errors:
        raise errors[0]


def _run_job(job: Job, sources: dict[Path, int], files: dict[str, PartFile]) -> str:
    data, digest = _read_source(job.source, sources)
    scale = None
    if job.quantize:
        data, scale = fp8.quantize_fp8(data, job.quantize, job.source.name)
    for o in job.outputs:
        t = scale if o.kind == "scale" else data
        assert t is not None
        if o.split is not None:
            size = o.shape[o.split.dim]
            t = t.narrow(o.split.dim, o.split.index * size, size)
        files[o.file].write(o, t)
    return digest


def _read_source(t: SourceTensor, sources: dict[Path, int]) -> tuple[torch.Tensor, str]:
    assert t.file is not None
    n = t.end - t.begin
    buf = bytearray(n)
    view = memoryview(buf)
    fd = sources[t.file]
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done : done + (1 << 30)]], t.begin + done)
        if got <= 0:
            raise BadCheckpoint(
                f"{t.file}: ended while reading tensor {t.name!r} (file changed during the run?)",
                path=str(t.file),
                tensor=t.name,
            )
        done += got
    digest = xxhash.xxh64(view).hexdigest()
    raw = torch.frombuffer(buf, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    dtype = DTYPES[t.dtype]
    if dtype.bits < 8 or dtype.bits % 8:
        return raw, digest  # sub-byte types travel as bytes (placement refuses to split them)
    return raw.view(torch_dtype(t.dtype)).reshape(t.shape), digest


def _hash_parts(parts: list[Part], staging: Path, workers: int | None) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=workers or min(8, len(parts))) as pool:
        digests = list(pool.map(lambda p: file_xxh64(staging / p.name), parts))
    return {
        p.name: {"rank": p.rank, "part": p.index, "size": p.size, "xxh64": d, "tensors": len(p.tensors)}
        for p, d in zip(parts, digests)
    }


def _copy_aux(src: Path, staging: Path, plan: ShardPlan) -> dict[str, dict[str, Any]]:
    names = [
        p.name
        for p in sorted(src.iterdir())
        if p.is_file() and (p.name in AUX_NAMES or p.name.endswith(AUX_SUFFIXES)) and p.name != INDEX_NAME
    ]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        dest = staging / name
        if name == CONFIG_NAME and plan.quantize:
            cfg = dict(plan.config.raw)
            cfg["quantization_config"] = fp8.quantization_config(plan.quantize, plan.ignored_modules)
            _write_durable(dest, (json.dumps(cfg, indent=2) + "\n").encode())
        else:
            shutil.copyfile(src / name, dest)
            fsync(dest)  # durable before the rename publishes it, as the parts are
        out[name] = {"size": dest.stat().st_size, "xxh64": file_xxh64(dest)}
    return out


def manifest_doc(
    plan: ShardPlan,
    parts: list[Part],
    files: dict[str, dict[str, Any]],
    aux: dict[str, dict[str, Any]],
    source: dict[str, Any],
) -> dict[str, Any]:
    """The hotweights.json content for a plan whose parts are laid out (and, normally, written)."""
    quant: dict[str, Any] | None = None
    if plan.quantize:
        quant = {
            "method": "fp8",
            "dtype": "F8_E4M3",
            "granularity": plan.quantize,
            "activation_scheme": "dynamic",
            "config": fp8.quantization_config(plan.quantize, plan.ignored_modules),
        }
    elif plan.source_format is not None:
        quant = {"method": plan.source_format.method, "from_source": True, "config": plan.source_format.config}
    tensors = []
    for p in parts:
        for o in p.tensors:
            tensors.append(
                {
                    "name": o.name,
                    "rank": o.rank,
                    "file": o.file,
                    "dtype": o.dtype,
                    "shape": list(o.shape),
                    "nbytes": o.nbytes,
                    "offset": o.begin,
                    "split": o.split.to_json() if o.split is not None else None,
                    "replicated": o.split is None or o.split.of < plan.tp,
                    "quantization": o.quantization,
                }
            )
    tensors.sort(key=lambda t: (t["rank"], t["file"], t["offset"]))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"hotweights shard {hotweights.__version__}",
        "source": source,
        "tp_size": plan.tp,
        "architecture": plan.config.architecture,
        "model_type": plan.config.model_type,
        "tied_embeddings": plan.tied_embeddings,
        "quantization": quant,
        "files": files,
        "aux_files": aux,
        "tensors": tensors,
    }


class _progress:
    """A rich progress bar on stderr over source bytes, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self._lock = threading.Lock()

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)

        def advance(n: int) -> None:
            with self._lock:
                self._bar.update(task, advance=n)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
