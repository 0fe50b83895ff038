"""GPU tests: skipped cleanly (with the reason) where torch sees no GPU or cuda-bindings is missing.

Helpers shared by the GPU tests: checkpoints with mixed dtypes, a CudaBackend, reading device
memory back, and running ``_child.py`` (a separate process that imports what this one exported).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024


def _skip_reason() -> str | None:
    try:
        import torch
    except Exception as exc:  # pragma: no cover
        return f"torch is not importable: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        from cuda.bindings import driver  # noqa: F401
    except Exception as exc:
        return f"cuda.bindings is not importable: {type(exc).__name__}: {exc}"
    return None


SKIP_REASON = _skip_reason()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def mixed_tensors(seed: int = 0, scale: int = 1) -> dict:
    """support/ckpt_tools.py's mixed dtypes, plus NaN/inf bit patterns and larger tensors (``scale`` widens ``big``)."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from support.ckpt_tools import mixed_tensors as base

    g = torch.Generator().manual_seed(seed + 1)
    tensors = base(seed)
    tensors["nan"] = torch.tensor([float("nan"), 1.0, float("-inf")])
    tensors["big"] = torch.randn(1024, 1024 * scale, generator=g)
    tensors["big_bf16"] = torch.randn(2048, 1000, generator=g).bfloat16()
    return tensors


def write_checkpoint(directory: Path, ranks: int = 1, parts: int = 2, seed: int = 0, scale: int = 1) -> Path:
    """``model-rank-{r}-part-{p}.safetensors`` files, mixed dtypes, different data per rank and part."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for r in range(ranks):
        for p in range(parts):
            tensors = {f"p{p}.{k}": v for k, v in mixed_tensors(seed + 100 * r + p, scale).items()}
            save_file(tensors, str(directory / f"model-rank-{r}-part-{p}.safetensors"))
    return directory


def backend(reserve: int = 256 * MiB, memory_limit: int | None = None, **loader):
    """A CudaBackend; ``loader`` holds LoaderSettings fields (GDS off unless given)."""
    from hotweightsd.backends.cuda import CudaBackend
    from hotweightsd.loaders.settings import LoaderSettings

    loader.setdefault("gds", "off")
    return CudaBackend(reserve=reserve, memory_limit=memory_limit, loader=LoaderSettings(**loader))


def load(b, ckpt: Path, rank: int = 0, device: int | None = None, mode=None):
    """plan_rank + allocate + fill, as the daemon's manager does. Returns (layout, allocations, description)."""
    import threading

    from hotweights.format.checkpoint import open_checkpoint
    from hotweightsd.core.backend import AllocationMode
    from hotweightsd.core.layout import plan_rank

    device = rank if device is None else device
    rf = open_checkpoint(ckpt).ranks[rank]
    layout = plan_rank(rf, b.granularity(device), b.max_allocation())
    allocs = []
    try:
        for s in layout.allocation_sizes:
            allocs.append(b.allocate(device, s, mode or AllocationMode.FD))
        desc = b.fill(layout, allocs, lambda n: None, threading.Event())
    except BaseException:
        for a in allocs:
            a.close()
        raise
    return layout, allocs, desc


def placements_json(layout) -> list[dict]:
    return [
        {
            "name": p.name,
            "dtype": p.dtype,
            "served_dtype": p.served_dtype,
            "shape": list(p.shape),
            "allocation": p.allocation,
            "offset": p.offset,
            "nbytes": p.nbytes,
            "file": p.file,
        }
        for p in layout.placements
    ]


def read_device(device: int, ptr: int, n: int) -> bytes:
    """Copies ``n`` bytes of device memory at ``ptr`` to the host (driver API, no torch)."""
    from hotweights.cuda import devices as cd

    buf = ctypes.create_string_buffer(max(n, 1))
    with cd.current(device) as drv:
        cd.check(drv.cuMemcpyDtoH(ctypes.addressof(buf), ptr, n), "cuMemcpyDtoH")
    return buf.raw[:n]


def file_bytes(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def assert_loaded_exactly(layout, allocs) -> None:
    for p in layout.placements:
        if p.nbytes:
            a = allocs[p.allocation]
            got = read_device(a.device, a.address + p.offset, p.nbytes)
            assert got == file_bytes(layout.files[p.file], p.file_offset, p.nbytes), f"{p.name} differs on the device"


def free_memory(device: int) -> int:
    from hotweights.cuda import devices as cd

    return cd.mem_info(device)[0]


def child_env() -> dict:
    env = dict(os.environ)
    root = HERE.parent.parent
    extra = [str(root / "client"), str(root / "daemon")]
    env["PYTHONPATH"] = os.pathsep.join(extra + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_child(command: str, spec: dict, pass_fds: tuple[int, ...] = (), timeout: float = 180) -> dict:
    """Runs ``_child.py command`` in a new process with ``spec`` on stdin; returns its JSON answer."""
    r = subprocess.run(
        [sys.executable, str(HERE / "_child.py"), command],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        pass_fds=pass_fds,
        env=child_env(),
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise AssertionError(f"child {command} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(lines[-1])
