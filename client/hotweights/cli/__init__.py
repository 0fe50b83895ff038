"""The ``hotweights`` command line: the daemon and the operator's commands.

Every command whose output is data takes ``--json``; numbers come out as JSON numbers (see
:func:`message_dict`). Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from hotweights import errors
from hotweights.cli.output import message_dict, print_json, print_version_info, version_info
from hotweights.client import Client, connect
from hotweights.units import format_size

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    # Plain help: the rich formatter prints a type placeholder after flags too ("--json <bool>").
    rich_markup_mode=None,
    help="hotweights: keep model weights resident on this node's GPUs and attach in milliseconds.",
)

SocketOpt = typer.Option(None, "--socket", "-s", envvar="HOTWEIGHTS_SOCKET", help="daemon socket path")
# The client commands read HOTWEIGHTS_SOCKET themselves, to say where a path came from when it fails.
ClientSocketOpt = typer.Option(
    None, "--socket", "-s", help="daemon socket path (default: $HOTWEIGHTS_SOCKET, else the standard path)"
)
# Load, unload, swap and alias go to the daemon's operator socket.
OperatorSocketOpt = typer.Option(
    None,
    "--operator-socket",
    help="the daemon's operator socket (default: $HOTWEIGHTS_OPERATOR_SOCKET, else <socket>.admin)",
)
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")
LayoutOpt = typer.Option(
    "",
    "--layout",
    help="serve in an engine's parameter layout: vllm (q|k|v and gate|up fused, vocabulary padded to 64); "
    "none or default: as the files are",
    show_default=False,
)
SwapLayoutOpt = typer.Option(
    "",
    "--layout",
    help="for a path target: vllm, or none for the files' own layout; default: the layout of the version "
    "the alias names",
    show_default=False,
)


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


@contextmanager
def _interrupted(progress: _Progress, message: str) -> Iterator[None]:
    """Ctrl-C stops the waiting, not the work: the daemon finishes a load it has taken, so say so and how
    to follow or stop it, and exit as an interrupted command does."""
    try:
        yield
    except KeyboardInterrupt:
        progress.end()
        typer.echo(f"interrupted: {message}", err=True)
        raise typer.Exit(130) from None


def _load_keeps_going(name: str, version: str | None) -> str:
    which = "" if version else " (VERSION: the one `hotweights list` shows LOADING)"
    return (
        f"the load of {name}{'@' + version if version else ''} keeps going in the daemon; follow it with "
        f"`hotweights watch {name}`, stop it with `hotweights unload {name}@{version or 'VERSION'}`{which}"
    )


def _swap_keeps_going(alias: str) -> str:
    return (
        f"the swap of {alias} keeps going in the daemon: {alias} moves once the new version is READY; follow it "
        f"with `hotweights watch {alias}`, stop it with `hotweights unload NAME@VERSION` of the version "
        "`hotweights list` shows LOADING"
    )


def _client(socket: str | None, timeout: float = 10.0, operator_socket: str | None = None) -> Client:
    return connect(socket, timeout=timeout, origin="--socket" if socket else None, operator_socket=operator_socket)


def _version_flag(value: bool) -> None:
    if value:
        print_version_info(version_info(None))
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_version_flag,
        help="print the versions of hotweights, its protocol, the daemon and the CUDA driver, and exit",
    ),
) -> None:
    """hotweights: keep model weights resident on this node's GPUs and attach in milliseconds."""


@app.command("version")
def version_(socket: str | None = ClientSocketOpt, json_out: bool = JsonOpt) -> None:
    """Versions: this package, the protocol, the daemon (when it answers) and the CUDA driver."""
    info = version_info(socket)
    if json_out:
        print_json(info)
    else:
        print_version_info(info)


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
        print_json(message_dict(info))
        return
    notes = ([f"alias {', '.join(info.aliases)}"] if info.aliases else []) + (
        [f"layout {info.layout}"] if info.layout else []
    )
    aliases = f" ({'; '.join(notes)})" if notes else ""
    if info.shares_memory_with:
        typer.echo(
            f"{verb} {info.name}@{info.version}{aliases}: {len(info.ranks)} rank(s), {format_size(info.bytes)}, "
            f"shares memory with {info.shares_memory_with} (same files): nothing read"
        )
        return
    rate = info.bytes / info.load_seconds / 1e9 if info.load_seconds else 0.0
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
    layout: str = LayoutOpt,
    socket: str | None = ClientSocketOpt,
    operator_socket: str | None = OperatorSocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Load a checkpoint into resident memory and wait until it is READY."""
    progress = _Progress(not json_out)
    try:
        dmap = [int(x) for x in device_map.split(",")] if device_map else []
    except ValueError:
        fail(errors.InvalidArgument(f"--device-map must be comma-separated integers, got {device_map!r}"))
    with reported(progress), _interrupted(progress, _load_keeps_going(name, version)):
        info = _client(socket, operator_socket=operator_socket).load(
            name,
            path,
            version=version,
            alias=alias,
            verify=verify,
            allocation="legacy_ipc" if legacy_ipc else None,
            device_map=dmap,
            wait=not no_wait,
            progress=progress,
            layout=layout,
        )
    if info.already_loaded and not json_out:
        # a repeated load (a provisioning script run again): nothing was read, and it is not an error
        from hotweights.wire.pb import pb

        state = pb.ModelState.Name(info.state)
        aliases = f", alias {', '.join(info.aliases)}" if info.aliases else ""
        laid = f", layout {info.layout}" if info.layout else ""
        typer.echo(f"{info.name}@{info.version} already loaded, same content ({state}{aliases}{laid}); nothing read")
        return
    _print_version(info, json_out, "registered" if no_wait else "loaded")


@app.command()
def swap(
    alias: str = typer.Argument(..., help="alias to move"),
    target: str = typer.Argument(..., help="NAME@VERSION, or a checkpoint path (a new version)"),
    version: str | None = typer.Option(None, help="version label for a path target"),
    mode: str = typer.Option("side-by-side", help="side-by-side | drain"),
    drain_timeout: float = typer.Option(60.0, help="seconds to wait for old leases in drain mode"),
    name: str | None = typer.Option(None, help="model name when the alias does not exist yet (with --create)"),
    verify: str | None = typer.Option(None, help="none | fast | full"),
    create: bool = typer.Option(False, "--create", help="the alias may be new (otherwise it must exist)"),
    keep_previous: bool | None = typer.Option(
        None,
        "--keep-previous/--no-keep-previous",
        help="keep the old version resident for `hotweights rollback` (default: the daemon's keep_previous, "
        "when memory allows)",
        show_default=False,
    ),
    layout: str = SwapLayoutOpt,
    socket: str | None = ClientSocketOpt,
    operator_socket: str | None = OperatorSocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Point an existing alias at another version; the old one is kept for a rollback, or freed when its
    last lease ends."""
    progress = _Progress(not json_out)
    with reported(progress), _interrupted(progress, _swap_keeps_going(alias)):
        info = _client(socket, operator_socket=operator_socket).swap(
            alias,
            target,
            version=version,
            mode=mode,
            drain_timeout=drain_timeout,
            verify=verify,
            name=name,
            progress=progress,
            create=create,
            keep_previous=keep_previous,
            layout=layout,
        )
    if info.already_loaded and not json_out:
        # the load's own figures would read as a fresh read with a throughput: nothing was read
        laid = f"; layout {info.layout}" if info.layout else ""
        typer.echo(f"{alias} -> {info.name}@{info.version} (resident{laid}; nothing read)")
    else:
        _print_version(info, json_out, f"{alias} ->")
    if info.previous_note and not json_out:
        typer.echo(f"  previous: {info.previous_note}")


@app.command()
def alias(
    alias: str = typer.Argument(...),
    target: str | None = typer.Argument(None, help="NAME@VERSION; omit with --remove"),
    create: bool = typer.Option(False, "--create", help="the alias may be new (otherwise it must exist)"),
    remove: bool = typer.Option(False, "--remove", help="delete the alias"),
    socket: str | None = ClientSocketOpt,
    operator_socket: str | None = OperatorSocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Point an existing alias (a new one with --create) at NAME@VERSION, or --remove it; loads nothing."""
    if remove and (target or create):
        raise typer.BadParameter("--remove takes no target and no --create", param_hint="TARGET")
    if not remove and not target:
        raise typer.BadParameter(
            "missing NAME@VERSION: `hotweights alias NAME NAME@VERSION [--create]`, or `--remove` to delete it",
            param_hint="TARGET",
        )
    with reported():
        c = _client(socket, operator_socket=operator_socket)
        info = c.remove_alias(alias) if remove else c.set_alias(alias, target or "", create=create)
    if json_out:
        print_json({**message_dict(info), "removed": remove})
        return
    typer.echo(f"{'removed' if remove else 'set'} {info.alias} -> {info.name}@{info.version}")


@app.command()
def rollback(
    alias: str = typer.Argument(..., help="alias a swap moved"),
    socket: str | None = ClientSocketOpt,
    operator_socket: str | None = OperatorSocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Point an alias back at the version a swap kept resident (swap --keep-previous); reads nothing."""
    with reported():
        r = _client(socket, operator_socket=operator_socket).rollback(alias)
    if json_out:
        print_json(message_dict(r))
        return
    typer.echo(f"{r.alias.alias} -> {r.alias.name}@{r.alias.version} (was {r.alias.name}@{r.old_version})")
    if r.version.previous_note:
        typer.echo(f"  previous: {r.version.previous_note}")


@app.command()
def unload(
    ref: str = typer.Argument(..., help="NAME (every version) or NAME@VERSION"),
    force: bool = typer.Option(False, "--force", help="unload although leases are live"),
    socket: str | None = ClientSocketOpt,
    operator_socket: str | None = OperatorSocketOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Free a model's resident memory."""
    with reported():
        c = _client(socket, operator_socket=operator_socket)
        # What --force takes with it, read first: the answer names only the versions unloaded.
        before = c.list().versions if force else []
        r = c.unload(ref, force=force)
    if json_out:
        print_json(message_dict(r))
        return
    typer.echo(f"unloaded {', '.join(r.unloaded)} ({format_size(r.bytes_freed)})")
    gone = [v for v in before if f"{v.name}@{v.version}" in r.unloaded]
    aliases = sorted({a for v in gone for a in v.aliases})
    if aliases:
        typer.echo(f"removed alias(es) {', '.join(aliases)}: clients attaching them now get NotFound")
        kept = [f"{v.name}@{v.version}" for v in before if v.previous_of in aliases and v not in gone]
        if kept:
            typer.echo(f"retired {', '.join(kept)}, kept for their rollback: freed when its last lease ends")
    leased = [(f"{v.name}@{v.version}", v.leases) for v in gone if v.leases]
    for key, n in leased:
        typer.echo(f"{key}: {n} live lease(s) still map its memory; it is freed when they end")


@app.command("list")
def list_(socket: str | None = ClientSocketOpt, json_out: bool = JsonOpt) -> None:
    """Models, versions, states and aliases."""
    with reported():
        r = _client(socket).list()
    if json_out:
        print_json(message_dict(r))
        return
    if not r.versions:
        typer.echo("no models loaded")
    for v in r.versions:
        state = type(v).DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[v.state].name
        aliases = f"  [{', '.join(v.aliases)}]" if v.aliases else ""
        err = f"  error: {v.error}" if v.error else ""
        if v.previous_of:
            until = time.strftime("%H:%M:%S", time.localtime(v.held_until_unix))
            retired = f"  previous of {v.previous_of}, kept until {until}"
        else:
            retired = "  retired: freed when its last lease ends" if v.retired else ""
        shares = f"  shares memory with {v.shares_memory_with}" if v.shares_memory_with else ""
        layout = f"  layout {v.layout}" if v.layout else ""
        typer.echo(
            f"{v.name}@{v.version}  {state}  ranks={len(v.ranks)}  {format_size(v.bytes)}  "
            f"leases={v.leases}{layout}{aliases}{shares}{retired}{err}"
        )


@app.command()
def status(socket: str | None = ClientSocketOpt, json_out: bool = JsonOpt) -> None:
    """The daemon: devices, memory, models and live leases."""
    with reported():
        s = _client(socket).status()
    if json_out:
        print_json(message_dict(s))
        return
    typer.echo(
        f"hotweightsd {s.daemon_version} pid {s.pid} backend {s.backend} on {s.socket}, "
        f"up {s.uptime_seconds:.0f}s{' (restored from fd store)' if s.restored else ''}"
    )
    for failure in s.start_failures:
        typer.echo(f"  failed at start: {failure}")
    if s.gds:
        typer.echo(f"  gds: {s.gds}")
    for d in s.devices:
        typer.echo(
            f"  device {d.index} {d.name}: {format_size(d.free_bytes)} free of {format_size(d.total_bytes)}, "
            f"{format_size(d.resident_bytes)} resident"
        )
    typer.echo(f"  {len(s.versions)} version(s), {len(s.leases)} lease(s), {format_size(s.resident_bytes)} resident")
    for v in s.versions:
        if v.shares_memory_with:  # its bytes are counted once, with the version it shares them with
            typer.echo(f"  {v.name}@{v.version} shares memory with {v.shares_memory_with} (resident once)")
        if v.layout:
            typer.echo(f"  {v.name}@{v.version} layout {v.layout}")
    for le in s.leases:
        typer.echo(f"  lease {le.lease_id[:8]} {le.name}@{le.version} pid {le.pid} {le.holder}")


@app.command()
def watch(
    ref: str = typer.Argument("", help="alias or model name; empty: everything"),
    socket: str | None = ClientSocketOpt,
    count: int = typer.Option(0, help="stop after N events"),
) -> None:
    """Print events (version ready, alias moved, ...) as JSON lines."""
    with reported():
        c = _client(socket)
        if ref:
            _known_ref(c, ref)
        if sys.stderr.isatty():
            typer.echo(f"watching {ref or 'every model and alias'} (Ctrl-C stops)", err=True)
        for i, ev in enumerate(c.watch(ref), 1):
            typer.echo(json.dumps(message_dict(ev)))
            if count and i >= count:
                break


def _known_ref(c: Client, ref: str) -> None:
    """Refuses a ref that names no alias and no model, where a watch would wait forever."""
    r = c.list()
    aliases = sorted({a.alias for a in r.aliases} | {a for v in r.versions for a in v.aliases})
    names = sorted({v.name for v in r.versions})
    if ref in aliases or ref in names:
        return
    known = "; ".join(
        part
        for part in (
            f"aliases: {', '.join(aliases)}" if aliases else "",
            f"models: {', '.join(names)}" if names else "",
        )
        if part
    )
    raise errors.NotFound(
        f"no alias or model named {ref!r} to watch ({known or 'nothing is loaded'}); "
        f"`hotweights watch` without a name follows every model and alias",
        ref=ref,
        aliases=aliases,
        models=names,
    )


@app.command()
def doctor(
    socket: str | None = ClientSocketOpt,
    models: list[str] | None = typer.Option(
        None, "--models", "-m", help="a model directory to check (storage, GDS, striping); repeat for more"
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="the daemon's config.toml (default /etc/hotweights/config.toml)"
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Check this node as an operator's checklist: OK, WARN or FAIL, each with its fix; exits 1 on any FAIL.

    Packages, NVIDIA driver and CUDA, GPUDirect Storage (nvidia_fs, cufile.json), the filesystems
    and Lustre striping of the model directories (--models, else the config's preload paths), the
    Lustre network, memlock, NUMA placement of the GPUs, and the daemon."""
    from hotweights.tools.doctor import FAIL, WARN, as_dicts, checks

    # Relative paths are the operator's, from here; doctor's probes read absolute ones.
    results = checks(
        socket,
        origin="--socket" if socket else None,
        models=[os.path.abspath(m) for m in models or ()],
        config=os.path.abspath(config) if config else None,
    )
    failed = sum(c.status == FAIL for c in results)
    warned = sum(c.status == WARN for c in results)
    if json_out:
        print_json(as_dicts(results))
    else:
        for c in results:
            typer.echo(f"{c.status.upper():4}  {c.name:22} {c.detail}")
            if c.fix and c.status != "ok":
                typer.echo(f"{'':28}fix: {c.fix}")
        typer.echo(f"{len(results)} checks: {failed} FAIL, {warned} WARN")
    raise typer.Exit(1 if failed else 0)


@app.command()
def metrics(
    socket: str | None = ClientSocketOpt,
    metrics_socket: str | None = typer.Option(
        None,
        "--metrics-socket",
        envvar="HOTWEIGHTS_METRICS_SOCKET",
        help="the daemon's metrics socket, where its config moved it (default: <socket>.metrics)",
    ),
) -> None:
    """Print the daemon's Prometheus metrics (the text format), read from its metrics socket."""
    from hotweights.paths import default_socket, metrics_socket_for

    sock = socket or default_socket()
    path = metrics_socket_for(sock, metrics_socket) if metrics_socket is not None else metrics_socket_for(sock)
    if path is None:
        fail(errors.FailedPrecondition(f"metrics are off (--metrics-socket {metrics_socket!r})"))
        return
    try:
        text = _read_metrics(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        if os.path.exists(sock) and isinstance(exc, FileNotFoundError):
            why = (
                f"the daemon on {sock} serves no metrics at {path}: its metrics_socket is off or elsewhere "
                "(pass --metrics-socket)"
            )
        else:
            why = f"no daemon answers at {path} (is it running on {sock}? start one with `hotweights serve`)"
        fail(errors.Unavailable(why, socket=sock))
        return
    except PermissionError:
        fail(errors.PermissionDenied(f"may not open {path}: the metrics socket is for the daemon's group"))
        return
    except (OSError, ValueError) as exc:
        fail(errors.Unavailable(f"reading metrics from {path} failed: {exc}", socket=sock))
        return
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_metrics(path: str, timeout: float = 10.0) -> str:
    """``GET /metrics`` over HTTP on the unix socket ``path``: the exposition text."""
    import http.client
    import socket as socketlib

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
            except BaseException:
                s.close()
                raise
            self.sock = s

    conn = UnixConnection("localhost", timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status} {resp.reason}: {body.strip()[:200]}")
        return body
    finally:
        conn.close()


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
        # prog_name: completion scripts and usage lines name the installed command, also under
        # `python -m hotweights`.
        app(argv, standalone_mode=True, prog_name="hotweights")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
