"""`hotweights doctor`: what this node offers hotweights, and what stands in its way."""

from __future__ import annotations

import glob
import importlib.metadata
import resource
from dataclasses import asdict, dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def checks(socket: str) -> list[Check]:
    out: list[Check] = []
    for pkg in ("grpcio", "protobuf", "torch", "cuda-bindings", "fastsafetensors"):
        v = _version(pkg)
        optional = pkg in ("cuda-bindings", "fastsafetensors")
        out.append(
            Check(
                f"package {pkg}",
                v is not None or optional,
                v or ("not installed" + (" (optional)" if optional else "")),
            )
        )

    gpus = "no GPU support"
    gpu_ok = False
    try:
        from hotweights.cuda import devices as cuda_driver

        n = cuda_driver.device_count()
        gpu_ok = n > 0
        gpus = f"{n} CUDA device(s) visible" if n else "no CUDA device visible (the cpu backend will be used)"
    except Exception as exc:  # the check reports, it must not fail
        gpus = f"CUDA driver unusable: {type(exc).__name__}: {exc}"
    out.append(Check("cuda devices", True, gpus))

    nvfs = sorted(glob.glob("/dev/nvidia-fs*"))
    out.append(
        Check(
            "GPUDirect Storage",
            True,
            f"{len(nvfs)} /dev/nvidia-fs* device(s): GDS path available"
            if nvfs
            else "no /dev/nvidia-fs*: loads use the pinned bounce path",
        )
    )

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unlimited = soft == resource.RLIM_INFINITY
    out.append(
        Check(
            "memlock limit",
            unlimited or not gpu_ok,
            "unlimited"
            if unlimited
            else f"{soft} bytes: pinned staging buffers may fail (LimitMEMLOCK=infinity in the unit)",
        )
    )

    nodes = glob.glob("/sys/devices/system/node/node[0-9]*")
    out.append(Check("NUMA nodes", True, f"{len(nodes) or 1}"))

    try:
        from hotweights.client import connect

        st = connect(socket, timeout=3).status()
        out.append(
            Check("daemon", True, f"pid {st.pid}, backend {st.backend}, {len(st.versions)} version(s) on {socket}")
        )
    except Exception as exc:
        out.append(Check("daemon", False, f"not reachable on {socket}: {exc}"))
    return out


def as_dicts(items: list[Check]) -> list[dict]:
    return [asdict(c) for c in items]
