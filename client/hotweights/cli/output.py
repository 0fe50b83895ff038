"""What the ``hotweights`` commands print: protobuf messages as JSON, and the version report."""

from __future__ import annotations

import base64
import json
from typing import Any

import typer

from hotweights import errors
from hotweights.client import connect


def message_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message as a dict of every field, with 64-bit integers as ints (``MessageToDict``
    renders them as strings), enums by name, bytes as base64, unset message fields left out."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        if fd.has_presence and not fd.is_repeated and not msg.HasField(fd.name):
            continue
        value = getattr(msg, fd.name)
        if fd.is_repeated:
            out[fd.name] = [_field_value(fd, v) for v in value]
        else:
            out[fd.name] = _field_value(fd, value)
    return out


def _field_value(fd: Any, value: Any) -> Any:
    if fd.type == fd.TYPE_MESSAGE:
        return message_dict(value)
    if fd.type == fd.TYPE_ENUM:
        known = fd.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if fd.type == fd.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2))


def version_info(socket: str | None) -> dict[str, Any]:
    """This package, its protocol, the daemon when one answers, the CUDA driver when importable."""
    import hotweights
    from hotweights.wire.pb import pb

    info: dict[str, Any] = {"hotweights": hotweights.__version__, "protocol": pb.DESCRIPTOR.package}
    try:
        c = connect(socket, timeout=3.0, origin="--socket" if socket else None)
        try:
            st = c.status()
        finally:
            c.close()
        info["daemon"] = {
            "reachable": True,
            "version": st.daemon_version,
            "backend": st.backend,
            "pid": st.pid,
            "socket": st.socket or c.socket,
            "gds": st.gds,
        }
    except errors.HotweightsError as exc:
        info["daemon"] = {"reachable": False, "socket": exc.details.get("socket", socket or ""), "error": str(exc)}
    info["cuda_driver"] = cuda_driver_version()
    return info


def cuda_driver_version() -> str | None:
    import importlib.util

    try:
        if importlib.util.find_spec("cuda.bindings") is None:
            return None
        from hotweights.cuda import driver

        v = int(driver.check(driver.driver().cuDriverGetVersion(), "cuDriverGetVersion"))
    except Exception:  # a version line must never fail on a broken or absent driver
        return None
    return f"{v // 1000}.{v % 1000 // 10}"


def print_version_info(info: dict[str, Any]) -> None:
    typer.echo(f"hotweights {info['hotweights']} (protocol {info['protocol']})")
    d = info["daemon"]
    if d["reachable"]:
        typer.echo(f"daemon: hotweightsd {d['version']}, backend {d['backend']}, pid {d['pid']} on {d['socket']}")
    else:
        typer.echo(f"daemon: not reachable at {d['socket']}")
    typer.echo(f"cuda driver: {info['cuda_driver'] or 'not available'}")
