"""Running the daemon: own the socket, build the core, serve gRPC and the fd channel, stop cleanly.

The wiring only: ``cli.py`` turns flags into a ``Config`` and calls ``run``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import stat
import sys
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hotweights.errors import AlreadyExists, ContentMismatch, HotweightsError, InvalidArgument
from hotweights.format.source import name_reader
from hotweights.paths import metrics_socket_for
from hotweights.wire.pb import pb, pb_grpc
from hotweightsd.backends import create_backend
from hotweightsd.config import Config
from hotweightsd.core import faults
from hotweightsd.core.faults import FaultPlan
from hotweightsd.core.manager import ModelManager
from hotweightsd.core.roles import Role
from hotweightsd.core.roots import ModelRoots
from hotweightsd.logging import configure
from hotweightsd.persist import systemd
from hotweightsd.persist.fdstore import Persister, state_path
from hotweightsd.persist.restore import restore
from hotweightsd.server.fdchannel import FdChannel
from hotweightsd.server.metrics import DaemonMetrics, MetricsServer, TextfileWriter
from hotweightsd.server.roles import RoleGuard
from hotweightsd.server.service import HotweightsService, grpc_options
from hotweightsd.server.sockets import SocketOwnership, born_with_mode, fd_socket_path, group_id, open_to_group
from hotweightsd.startfailures import StartFailures
from hotweightsd.threadnames import name_threads

log = structlog.get_logger("hotweightsd")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Hotweights"].full_name


async def serve(cfg: Config) -> None:
    # The state file is read and written only while this daemon holds the socket's lock.
    if cfg.operator_socket in (cfg.socket, fd_socket_path(cfg.socket)):
        raise InvalidArgument(f"operator_socket must differ from the readers' sockets, got {cfg.operator_socket}")
    operator_gid = group_id(cfg.operator_group) if cfg.operator_group else None
    ownership = SocketOwnership(cfg.socket, others=(cfg.operator_socket,))
    plan = FaultPlan.parse(cfg.faults)
    faults.install(plan)
    if plan:
        log.warning("faults.planned", plan=plan.describe(), note="loads fail on purpose (tests of failure paths)")
    backend = create_backend(
        cfg.backend, reserve=cfg.reserve, memory_limit=cfg.memory_limit, loader=cfg.loader_settings()
    )
    roots = ModelRoots(cfg.model_roots)
    if roots.confined:
        log.info("model_roots", roots=list(roots.roots))
    else:
        log.warning("model_roots.unset", note="loads are not confined: any path the daemon can read may be loaded")
    manager = ModelManager(
        backend,
        ticket_ttl=cfg.ticket_ttl,
        default_verify=cfg.verify,
        roots=roots,
        max_checkpoint_files=cfg.max_checkpoint_files,
        keep_previous=cfg.keep_previous,
        keep_previous_seconds=cfg.keep_previous_seconds,
        header_limits=cfg.header_limits(),
        max_leases_per_pid=cfg.max_leases_per_pid,
    )
    fd_path = fd_socket_path(cfg.socket)
    health_servicer = health.aio.HealthServicer()
    not_serving = _not_serving(health_servicer, asyncio.get_running_loop())
    persister = Persister(
        manager,
        state_path(cfg.socket, cfg.state_dir),
        cfg.socket,
        fdstore=systemd.fdstore_enabled(),
        on_failure=not_serving,
    )
    # Said at start: otherwise the operator learns it only after the restart that read storage again.
    no_fdstore = systemd.no_fdstore_note()
    if no_fdstore:
        log.warning("systemd.no_fdstore", note=no_fdstore)
    report = restore(manager, backend, persister, systemd.listen_fds())
    persister.start()
    metrics = DaemonMetrics.for_manager(manager)
    channel = FdChannel(
        fd_path,
        manager,
        on_connection=lambda outcome: metrics.fd_channel.labels(outcome).inc(),
        timeout=cfg.fd_channel_timeout_seconds,
        max_connections=cfg.fd_channel_max_connections,
        max_per_pid=cfg.fd_channel_max_per_pid,
        max_per_uid=cfg.fd_channel_max_per_uid,
        max_unacked_per_uid=cfg.fd_channel_max_unacked_per_uid,
        ticket_timeout=cfg.fd_channel_ticket_seconds,
        on_failure=not_serving,
    )
    # The role is the socket: readers' calls that need an operator are refused on theirs.
    server = grpc.aio.server(
        options=grpc_options(), interceptors=[RoleGuard(Role.READER, cfg.socket, cfg.operator_socket)]
    )
    operator_server = grpc.aio.server(options=grpc_options())
    service = HotweightsService(
        manager,
        cfg.socket,
        fd_path,
        restored=bool(report.restored),
        restore_note=report.note,
        metrics=metrics,
        watch_queue=cfg.watch_queue,
    )
    failures = StartFailures(service.start_failures, manager.events)
    failures.aliases_dropped(report.dropped_aliases.items())
    metrics_path = metrics_socket_for(cfg.socket, cfg.metrics_socket)
    try:
        metrics_server = (
            MetricsServer(
                metrics_path, metrics, timeout=cfg.metrics_timeout_seconds, max_connections=cfg.metrics_max_connections
            )
            if metrics_path
            else None
        )
    except OSError as exc:
        # bind() names no path in its error: the operator must learn which of the sockets failed
        raise OSError(exc.errno, exc.strerror, exc.filename or metrics_path) from None
    textfile = TextfileWriter(cfg.metrics_textfile, metrics, cfg.metrics_interval) if cfg.metrics_textfile else None
    for s in (server, operator_server):
        pb_grpc.add_HotweightsServicer_to_server(service, s)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, s)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), s)

    # The operator socket first: once the readers' socket answers, both do.
    with born_with_mode(0o600):
        _bind(operator_server, cfg.operator_socket)
        await operator_server.start()
    if operator_gid is not None:
        open_to_group(cfg.operator_socket, operator_gid)
    with born_with_mode(0o660):
        _bind(server, cfg.socket)
        await server.start()
    if metrics_server is not None:
        metrics_server.start()
    if textfile is not None:
        textfile.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if persister.failure is not None:  # died before SERVING was set, which would otherwise hide it
        not_serving(persister.failure)
    # After SERVING: a channel that dies at once turns health NOT_SERVING, and nothing sets it back.
    channel.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "daemon.serving",
        socket=cfg.socket,
        operator_socket=cfg.operator_socket,
        operator_group=cfg.operator_group or "none",
        config=cfg.config or "none",
        state=str(persister.state_path),
        metrics=metrics_path or "off",
        metrics_textfile=cfg.metrics_textfile or "none",
        backend=backend.name,
        pid=os.getpid(),
        devices=[d.name for d in await asyncio.to_thread(backend.devices)],
        restore=report.note,
    )
    # READY before any load: a cold preload must not count against the start timeout.
    await asyncio.to_thread(
        systemd.ready,
        f"serving on {cfg.socket}; {report.note or 'nothing to restore'}"
        f"{'; no fd store: a restart reloads from storage' if no_fdstore else ''}",
    )
    watchdog = asyncio.ensure_future(systemd.watchdog_loop(stop))
    # pinning staging buffers costs more than a load's copies: do it now, off the first load's clock
    prepare = asyncio.ensure_future(asyncio.to_thread(backend.prepare))
    prepare.add_done_callback(_log_failure("backend.prepare_failed"))

    async def load_at_start() -> None:
        failed = failures.load_failed
        await _load_all(manager, report.to_reload, "reload", metrics, failed, settled=persister.settled)
        await _load_all(
            manager,
            [{**item, "aliases": [item["alias"]] if item.get("alias") else []} for item in cfg.preload],
            "preload",
            metrics,
            failed,
        )

    # Beside the wait for a stop, not before it: a SIGTERM during a long reload stops the daemon now (the
    # reloads not yet settled stay in the state file for the next start).
    at_start = asyncio.ensure_future(load_at_start())
    at_start.add_done_callback(_log_failure("daemon.load_at_start_failed"))
    try:
        await stop.wait()
    finally:
        at_start.cancel()
        failures.unsubscribe()
        log.info("daemon.stopping")
        await asyncio.to_thread(systemd.stopping)
        watchdog.cancel()
        await asyncio.to_thread(persister.close)
        await health_servicer.enter_graceful_shutdown()
        await asyncio.gather(server.stop(grace=2.0), operator_server.stop(grace=2.0))
        service.close()
        await asyncio.to_thread(channel.stop)
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.stop)
        if textfile is not None:
            await asyncio.to_thread(textfile.stop)
        metrics.unsubscribe()
        await asyncio.to_thread(manager.close)
        for path in (cfg.socket, cfg.operator_socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        ownership.release()
        log.info("daemon.stopped")


def _bind(server: grpc.aio.Server, path: str) -> None:
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError:  # gRPC says only "failed to bind", with no cause: the directory is the usual one
        raise OSError(None, "gRPC could not bind a socket there (its log line above says why)", path) from None


def _start_error(exc: OSError) -> str:
    """One line for the journal: the path, the cause, and who the daemon runs as against whom the directory lets in."""
    cause = exc.strerror or str(exc)
    if isinstance(exc, FileExistsError):  # mkdir of a socket's directory, where a file already is
        cause = "a file is in the way of the directory"
    if not exc.filename:
        return f"cannot start: {cause}"
    path = os.fsdecode(exc.filename)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
        if stat.S_ISDIR(st.st_mode):
            owner = _user(st.st_uid)
            where = f"; {directory} is owned by {owner}, mode {stat.S_IMODE(st.st_mode):04o}"
        else:
            where = f"; {directory} is not a directory"
    except OSError as parent:
        where = f"; {directory}: {parent.strerror}"
    return f"cannot create {path}: {cause} (running as user {_user(os.geteuid())}{where})"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _not_serving(health_servicer: health.aio.HealthServicer, loop: asyncio.AbstractEventLoop):
    """A callback for any thread: a dead sub-service turns the daemon's health NOT_SERVING."""

    async def mark() -> None:
        for name in (SERVICE_NAME, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    return lambda exc: asyncio.run_coroutine_threadsafe(mark(), loop)


def _log_failure(event: str):
    def done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning(event, error=str(task.exception()))

    return done


async def _load_all(
    manager: ModelManager,
    items: list[dict],
    what: str,
    metrics: DaemonMetrics,
    failed: Callable[..., None],
    settled: Callable[[str], None] | None = None,
) -> None:
    """Loads each item ({name, path, version?, verify?, layout?, aliases}); a failure is logged, not fatal,
    and told to ``failed`` with its item in one line: the daemon is READY by then, so the journal alone would hide it.
    ``settled`` is told each item's NAME@VERSION once its load is over, whatever the outcome."""
    for item in items:
        label = f"{what} {item['name']}{'@' + item['version'] if item.get('version') else ''} from {item['path']}"
        mv = None
        aliased: list[str] = []  # the item's aliases set before a failure: they name its version already
        try:
            try:
                mv, fill = await asyncio.to_thread(
                    manager.begin_load,
                    item["name"],
                    item["path"],
                    version=item.get("version"),
                    verify=item.get("verify"),
                    layout=item.get("layout") or "",
                )
            except AlreadyExists:
                raise
            except HotweightsError as exc:
                metrics.refused(exc)  # a failed read is counted from its VERSION_FAILED event
                raise
            await asyncio.to_thread(fill)
            for alias in item.get("aliases", ()):
                await asyncio.to_thread(manager.set_alias, alias, mv.key, create=True)
                aliased.append(alias)
            log.info(f"{what}.done", model=mv.key, path=item["path"])
        except ContentMismatch as exc:
            log.warning(f"{what}.skipped", name=item["name"], path=item["path"], error=str(exc))
            failed(item, f"{label}: skipped: {exc}")  # its version is another content's: nothing to seed
        except AlreadyExists:
            pass  # going away: nothing to load over it
        except HotweightsError as exc:
            log.error(f"{what}.failed", name=item["name"], path=item["path"], error=str(exc))
            loaded = {"loaded_version": mv.version} if mv is not None else {}
            failed({**item, **loaded}, f"{label}: {exc}", aliased)
        if settled is not None:
            settled(f"{item['name']}@{item.get('version')}")


def run(cfg: Config) -> int:
    configure(cfg.log_format, cfg.log_level)
    name_threads()
    name_reader("the daemon")
    try:
        asyncio.run(serve(cfg))
    except HotweightsError as exc:
        print(f"hotweights serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a socket, lock or state path the daemon cannot make: the operator's to fix
        print(f"hotweights serve: {_start_error(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Flags would be ignored here: the entry points are `hotweightsd` and `python -m hotweightsd`.
    print("run the daemon with `hotweights serve`, `hotweightsd` or `python -m hotweightsd`", file=sys.stderr)
    sys.exit(2)
