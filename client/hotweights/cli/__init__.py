"""The ``hotweights`` command line: the daemon and the operator's commands."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from google.protobuf.json_format import MessageToDict

from hotweights import errors
from hotweights.client import connect
from hotweights.units import format_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="hotweights: keep model weights resident on this node's GPUs and attach in milliseconds.",
)

SocketOpt = typer.Option(None, "--socket", "-s", envvar="HOTWEIGHTS_SOCKET", help="daemon socket path")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")


def fail(err: Exception) -> None:
    typer.echo(f"hotweights: {err}", err=True)
    raise typer.Exit(1)


@contextmanager
def reported(progress: _Progress | None = None) -> Iterator[None]:
    """Turns a hotweights error into the one-line message and exit status 1 of every command."""
    try:
        yield
    except errors.HotweightsError as exc:
        if progress is not None:
            progress.end()
        fail(exc)
    if progress is not None:
        progress.end()


def as_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the daemon in the foreground (systemd runs this); `hotweights serve --help` lists its flags."""
    from hotweightsd.cli import main as serve_main

    raise typer.Exit(serve_main(ctx.args))


class _Progress:
    """One status line on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.enabled and total:
            rate = done / max(time.perf_counter() - self.t0, 1e-9) / 1e9
            sys.stderr.write(f"\r  {done / total:6.1%}  {format_size(done)} / {format_size(total)}  {rate:.2f} GB/s ")
            sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _print_version(info, json_out: bool, verb: str) -> None:
    if json_out:
        typer.echo(json.dumps(as_dict(info), indent=2))
        return
    rate = info.bytes / info.load_seconds / 1e9 if info.load_seconds else 0.0
    aliases = f" (alias {', '.join(info.aliases)})" if info.aliases else ""
    typer.echo(
        f"{verb} {info.name}@{info.version}{aliases}: {len(info.ranks)} rank(s), {format_size(info.bytes)} "
        f"in {info.load_seconds:.2f}s ({rate:.2f} GB/s) via {info.load_path or 'n/a'}"
    )


@app.command()
def load(
    name: str = typer.Argument(..., help="model name"),
    path: Path = typer.Argument(..., help="safetensors file, HF directory, or sharded directory"),
    version: str | None = typer.Option(None, help="version label (default: derived from the files)"),
    alias: str | None = typer.Option(None, help="point this alias at the version once ready"),
    verify: str | None = typer.Option(None, help="none | fast | full (checks hotweights.json)"),
    legacy_ipc: bool = typer.Option(False, "--legacy-ipc", help="cudaMalloc + cudaIpcMemHandle (dies with daemon)"),
    device_map: str | None = typer.Option(None, help="comma-separated device per rank, e.g. 0,1"),
    no_wait: bool = typer.Option(False, "--no-wait", help="return once registered"),
    socket: str | None = SocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Load a checkpoint into resident memory and wait until it is READY."""
    progress = _Progress(not json_out)
    try:
        dmap = [int(x) for x in device_map.split(",")] if device_map else []
    except ValueError:
        fail(errors.InvalidArgument(f"--device-map must be comma-separated integers, got {device_map!r}"))
    with reported(progress):
        info = connect(socket).load(
            name,
            path,
            version=version,
            alias=alias,
            verify=verify,
            allocation="legacy_ipc" if legacy_ipc else None,
            device_map=dmap,
            wait=not no_wait,
            progress=progress,
        )
    _print_version(info, json_out, "registered" if no_wait else "loaded")


@app.command()
def swap(
    alias: str = typer.Argument(..., help="alias to move"),
    target: str = typer.Argument(..., help="NAME@VERSION, or a checkpoint path (a new version)"),
    version: str | None = typer.Option(None, help="version label for a path target"),
    mode: str = typer.Option("side-by-side", help="side-by-side | drain"),
    drain_timeout: float = typer.Option(60.0, help="seconds to wait for old leases in drain mode"),
    name: str | None = typer.Option(None, help="model name when the alias does not exist yet"),
    verify: str | None = typer.Option(None, help="none | fast | full"),
    socket: str | None = SocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Point an alias at a new version; the old one is freed when its last lease ends."""
    progress = _Progress(not json_out)
    with reported(progress):
        info = connect(socket).swap(
            alias,
            target,
            version=version,
            mode=mode,
            drain_timeout=drain_timeout,
            verify=verify,
            name=name,
            progress=progress,
        )
    _print_version(info, json_out, f"{alias} ->")


@app.command()
def alias(
    alias: str = typer.Argument(...),
    target: str | None = typer.Argument(None, help="NAME@VERSION; omit with --remove"),
    remove: bool = typer.Option(False, "--remove"),
    socket: str | None = SocketOpt,
) -> None:
    """Set or remove an alias without loading anything."""
    with reported():
        c = connect(socket)
        info = c.remove_alias(alias) if remove else c.set_alias(alias, target or "")
    typer.echo(f"{'removed' if remove else 'set'} {info.alias} -> {info.name}@{info.version}")


@app.command()
def unload(
    ref: str = typer.Argument(..., help="NAME (every version) or NAME@VERSION"),
    force: bool = typer.Option(False, "--force", help="unload although leases are live"),
    socket: str | None = SocketOpt,
) -> None:
    """Free a model's resident memory."""
    with reported():
        r = connect(socket).unload(ref, force=force)
    typer.echo(f"unloaded {', '.join(r.unloaded)} ({format_size(r.bytes_freed)})")


@app.command("list")
def list_(socket: str | None = SocketOpt, json_out: bool = JsonOpt) -> None:
    """Models, versions, states and aliases."""
    with reported():
        r = connect(socket).list()
    if json_out:
        typer.echo(json.dumps(as_dict(r), indent=2))
        return
    if not r.versions:
        typer.echo("no models loaded")
    for v in r.versions:
        state = type(v).DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[v.state].name
        aliases = f"  [{', '.join(v.aliases)}]" if v.aliases else ""
        err = f"  error: {v.error}" if v.error else ""
        typer.echo(
            f"{v.name}@{v.version}  {state}  ranks={len(v.ranks)}  {format_size(v.bytes)}  "
            f"leases={v.leases}{aliases}{err}"
        )


@app.command()
def status(socket: str | None = SocketOpt, json_out: bool = JsonOpt) -> None:
    """The daemon: devices, memory, models and live leases."""
    with reported():
        s = connect(socket).status()
    if json_out:
        typer.echo(json.dumps(as_dict(s), indent=2))
        return
    typer.echo(
        f"hotweightsd {s.daemon_version} pid {s.pid} backend {s.backend} on {s.socket}, "
        f"up {s.uptime_seconds:.0f}s{' (restored from fd store)' if s.restored else ''}"
    )
    for d in s.devices:
        typer.echo(
            f"  device {d.index} {d.name}: {format_size(d.free_bytes)} free of {format_size(d.total_bytes)}, "
            f"{format_size(d.resident_bytes)} resident"
        )
    typer.echo(f"  {len(s.versions)} version(s), {len(s.leases)} lease(s), {format_size(s.resident_bytes)} resident")
    for le in s.leases:
        typer.echo(f"  lease {le.lease_id[:8]} {le.name}@{le.version} pid {le.pid} {le.holder}")


@app.command()
def watch(
    ref: str = typer.Argument("", help="alias or model name; empty: everything"),
    socket: str | None = SocketOpt,
    count: int = typer.Option(0, help="stop after N events"),
) -> None:
    """Print events (version ready, alias moved, ...) as JSON lines."""
    with reported():
        for i, ev in enumerate(connect(socket).watch(ref), 1):
            typer.echo(json.dumps(as_dict(ev)))
            if count and i >= count:
                break


@app.command()
def doctor(socket: str | None = SocketOpt, json_out: bool = JsonOpt) -> None:
    """Check this node: packages, GPUs, GDS, memlock limit, NUMA, and the daemon."""
    from hotweights.paths import default_socket
    from hotweights.tools.doctor import as_dicts, checks

    results = checks(socket or default_socket())
    if json_out:
        typer.echo(json.dumps(as_dicts(results), indent=2))
    else:
        for c in results:
            typer.echo(f"{'ok ' if c.ok else 'BAD'}  {c.name:22} {c.detail}")
    raise typer.Exit(0 if all(c.ok for c in results) else 1)


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".demo"), help="where the sample checkpoint and socket go"),
    size_mb: int = typer.Option(256, help="sample checkpoint size"),
) -> None:
    """Create a sample checkpoint, start a daemon, load it, attach from a separate process, compare times."""
    from hotweights.tools.demo import run_demo

    raise typer.Exit(run_demo(workdir, size_mb))


def _register_optional() -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec("hotweights.cli.offline") is not None:
        importlib.import_module("hotweights.cli.offline").register(app)


_register_optional()


def main(argv: list[str] | None = None) -> int:
    try:
        app(argv, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
