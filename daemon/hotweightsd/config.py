"""The daemon's configuration: defaults < TOML file < HOTWEIGHTS_* environment < command-line flags.

This module is the daemon's only reader of the environment's HOTWEIGHTS_* variables (the service
manager's own protocol variables are read by persist/systemd.py). Every key is a field of ``Config``
with its type, default, allowed values and help in one place; the command line (``cli.py``) builds
its flags from the same fields, and ``Config.loader_settings()`` hands the loader its part.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotweights.errors import HotweightsError, InvalidArgument
from hotweights.format.checkpoint import MAX_TENSORS_PER_RANK, HeaderLimits
from hotweights.format.engine_layout import check_layout
from hotweights.format.safetensors import MAX_TENSORS_PER_FILE
from hotweights.paths import operator_socket_for, socket_for
from hotweights.units import parse_size
from hotweightsd.core.faults import FaultPlan
from hotweightsd.core.leases import MAX_LEASES_PER_PID
from hotweightsd.core.registry import check_name
from hotweightsd.loaders.settings import (
    ENGINES,
    MAX_DEPTH,
    MAX_THREADS,
    READ_MODES,
    READ_ORDERS,
    RING_MEMORIES,
    LoaderSettings,
)
from hotweightsd.server.metrics import METRICS_MAX_CONNECTIONS, METRICS_TIMEOUT_SECONDS
from hotweightsd.server.watchers import QUEUE_DEPTH

# Read when neither --config nor HOTWEIGHTS_CONFIG names a file; tests point it elsewhere.
SYSTEM_CONFIG = "/etc/hotweights/config.toml"
# --config none / HOTWEIGHTS_CONFIG=none: read no file at all (what every test daemon passes).
NO_CONFIG = "none"
ENV_PREFIX = "HOTWEIGHTS_"
DEFAULT_RESERVE = 2 * 2**30
# LoaderSettings field -> the config key that sets it.
LOADER_KEYS = {
    "read_mode": "loader",
    "threads": "loader_threads",
    "chunk_size": "chunk_size",
    "ring_depth": "ring_depth",
    "busy_chunk_size": "busy_chunk_size",
    "read_order": "read_order",
    "engine": "loader_engine",
    "gds": "gds",
    "share_cores": "share_cores",
    "native_lib": "native_lib",
    "direct_read_size": "direct_read_size",
    "direct_chunk_size": "direct_chunk_size",
    "ring_memory": "ring_memory",
}
# Client-side variables: read by the client library and tools, not by the daemon's config.
# (HOTWEIGHTS_SOCKET and HOTWEIGHTS_OPERATOR_SOCKET are read by both: the same path on both sides.)
CLIENT_ENV = frozenset({"HOTWEIGHTS_DISABLE_CUDA", "HOTWEIGHTS_CUDA_WRITABLE"})
# Upper bounds of the time keys: past them a value is a typo, and timers overflow long before inf.
_HOUR = 3600.0
_DAY = 24 * _HOUR
_WEEK = 7 * _DAY


def _key(
    default: Any,
    help: str,
    *,
    kind: str = "str",
    choices: tuple[str, ...] = (),
    aliases: Mapping[str, str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    flag: bool = True,
    env: bool = True,
    metavar: str = "",
) -> Any:
    meta = {
        "help": help,
        "kind": kind,
        "choices": choices,
        "aliases": dict(aliases or {}),
        "minimum": minimum,
        "maximum": maximum,
        "flag": flag,
        "env": env,
        "metavar": metavar,
    }
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    socket: str = _key("", "the daemon's gRPC socket; the fd channel is <socket>.fds", metavar="PATH")
    operator_socket: str = _key(
        "auto",
        "gRPC socket for operator calls (load, unload, swap, alias); auto: <socket>.admin",
        metavar="PATH",
    )
    operator_group: str = _key(
        "",
        "group that may use the operator socket (mode 0660); empty: owner only (0600)",
        metavar="GROUP",
    )
    backend: str = _key("auto", "memory kind; auto: cuda where a GPU is seen", choices=("auto", "cpu", "cuda"))
    reserve: int = _key(
        DEFAULT_RESERVE,
        "memory kept free on every device (host memory for cpu) for the serving processes",
        kind="size",
        minimum=0,
    )
    memory_limit: int | None = _key(None, "cap on resident bytes per device (cpu: in all)", kind="size", minimum=1)
    loader: str = _key(
        "auto",
        "how the cuda loader reads files (auto: buffered where in the page cache, O_DIRECT where cold, per range)",
        choices=READ_MODES,
    )
    loader_threads: int | None = _key(
        None,
        "reader threads per rank; default: the core count less 4, 4 to 16",
        kind="int",
        minimum=1,
        maximum=MAX_THREADS,
    )
    chunk_size: int | None = _key(None, "bytes per read of the cuda loader; default: measured", kind="size", minimum=1)
    ring_depth: int | None = _key(None, "pinned buffers in flight per reader", kind="int", minimum=1, maximum=MAX_DEPTH)
    ring_memory: str = _key(
        "driver",
        "the pinned ring's memory: driver (cuMemHostAlloc) or huge (transparent huge pages registered with "
        "cuMemHostRegister: an O_DIRECT read's pages physically contiguous in 2 MiB runs)",
        choices=RING_MEMORIES,
    )
    busy_chunk_size: int | None = _key(
        None, "bytes per read while other GPUs load at the same time", kind="size", minimum=1
    )
    read_order: str = _key(
        "file",
        "the order the cuda loader's readers take a rank's reads in (file: file by file; streams: each "
        "reader through its own contiguous share of the rank, so buffered reads keep their readahead)",
        choices=READ_ORDERS,
    )
    loader_engine: str = _key("auto", "the cuda loader's loop; auto: native where it was built", choices=ENGINES)
    direct_read_size: int | None = _key(
        None,
        "bytes per request of the cuda loader's O_DIRECT (cold) reads; a chunk_size or more: one request per "
        "read; default: measured",
        kind="size",
        minimum=1,
    )
    direct_chunk_size: int | None = _key(
        None,
        "bytes per O_DIRECT (cold) read of the native engine: cold ranges are read on this grid, buffered ones "
        "on chunk_size's; a chunk_size or more: every read on chunk_size's grid; default: measured",
        kind="size",
        minimum=1,
    )
    gds: str = _key(
        "auto",
        "GPUDirect Storage: auto (where /dev/nvidia-fs* exists), off, on (or an error; alias force), "
        "compat (cuFile's compatibility mode, a check of the path)",
        choices=("auto", "off", "on", "compat"),
        aliases={"force": "on"},
    )
    share_cores: bool = _key(True, "ranks loading at once split the cores between them", kind="bool")
    native_lib: str = _key("", "the native loader library; default: the one built beside the package", metavar="PATH")
    ticket_ttl: float = _key(30.0, "seconds a GetHandles ticket stays valid", kind="float", minimum=0.001, maximum=_DAY)
    max_leases_per_pid: int = _key(
        MAX_LEASES_PER_PID,
        "leases one process (by the pid it gives) holds at once; more are refused",
        kind="int",
        minimum=1,
    )
    fd_channel_timeout_seconds: float = _key(
        5.0,
        "seconds one exchange on the fd socket may take before it is cut",
        kind="float",
        minimum=0.001,
        maximum=_HOUR,
    )
    fd_channel_max_connections: int = _key(
        1024, "connections the fd socket keeps open at once; more are answered busy", kind="int", minimum=1
    )
    fd_channel_max_per_pid: int = _key(
        8, "connections one process may hold open on the fd socket; more are answered busy", kind="int", minimum=1
    )
    fd_channel_max_per_uid: int = _key(
        256, "connections one user may hold open on the fd socket; more are answered busy", kind="int", minimum=1
    )
    fd_channel_max_unacked_per_uid: int = _key(
        16,
        "fd socket exchanges one user may leave unacknowledged (fds unread) past the deadline; then it is busy",
        kind="int",
        minimum=1,
    )
    fd_channel_ticket_seconds: float = _key(
        2.0,
        "seconds a connection to the fd socket has to send its ticket line",
        kind="float",
        minimum=0.001,
        maximum=_HOUR,
    )
    max_tensors_per_file: int = _key(
        MAX_TENSORS_PER_FILE,
        "a checkpoint file listing more tensors is refused before its header is parsed",
        kind="int",
        minimum=1,
    )
    max_tensors_per_rank: int = _key(
        MAX_TENSORS_PER_RANK,
        "a checkpoint whose rank lists more tensors (all its files) is refused",
        kind="int",
        minimum=1,
    )
    watch_queue: int = _key(
        QUEUE_DEPTH,
        "events a Watch stream may leave unread; a watcher further behind is dropped",
        kind="int",
        minimum=1,
    )
    verify: str = _key("fast", "default check of a load against its hotweights.json", choices=("none", "fast", "full"))
    keep_previous: bool = _key(
        True,
        "a swap keeps the previous version resident, unaliased, for keep_previous_seconds so that "
        "`hotweights rollback` moves back at once (only when free memory holds another version of the new one's size)",
        kind="bool",
    )
    keep_previous_seconds: float = _key(
        600.0, "seconds a swap keeps the previous version for a rollback", kind="float", minimum=0, maximum=_WEEK
    )
    log_format: str = _key(
        "auto", "auto: console on a terminal, JSON lines otherwise", choices=("auto", "console", "json")
    )
    log_level: str = _key("info", "lowest level logged", choices=("debug", "info", "warning", "error"))
    state_dir: str = _key(
        "", "directory of the restart state file <socket name>.state.json; default: the socket's", metavar="DIR"
    )
    metrics_socket: str = _key(
        "auto",
        "unix socket serving the Prometheus text over HTTP; auto: <socket>.metrics; off: none",
        metavar="PATH",
    )
    metrics_timeout_seconds: float = _key(
        METRICS_TIMEOUT_SECONDS,
        "seconds a metrics connection may stay silent before it is closed",
        kind="float",
        minimum=0.001,
        maximum=_HOUR,
    )
    metrics_max_connections: int = _key(
        METRICS_MAX_CONNECTIONS,
        "connections the metrics socket serves at once; more are answered 503",
        kind="int",
        minimum=1,
    )
    metrics_textfile: str = _key(
        "", "file rewritten with the Prometheus text (node-exporter's textfile collector); empty: none", metavar="PATH"
    )
    metrics_interval: float = _key(
        15.0, "seconds between rewrites of metrics_textfile", kind="float", minimum=0.1, maximum=_DAY
    )
    model_roots: list[str] = _key(
        [],
        "directories loads may read from (links are judged by where they lead); empty: any path, with a "
        "warning at start",
        kind="paths",
        metavar="DIR:DIR",
    )
    max_checkpoint_files: int = _key(
        4096, "most files one checkpoint may hold open during its load", kind="int", minimum=1
    )
    faults: str = _key(
        "",
        "for tests of failure paths only: load stages that fail on purpose, POINT[:after=N][:times=M],... "
        "(hotweightsd/core/faults.py); empty: none",
        kind="faults",
        metavar="PLAN",
    )
    preload: list[dict[str, Any]] = _key(
        [],
        "[[preload]] tables (name, path, version?, alias?, verify?, layout?) loaded at start",
        kind="preload",
        flag=False,
        env=False,
    )
    # Where the values came from; not a key of the file.
    config: str = field(default="", metadata={"internal": True})

    def loader_settings(self) -> LoaderSettings:
        return LoaderSettings(**{setting: getattr(self, key) for setting, key in LOADER_KEYS.items()})

    def header_limits(self) -> HeaderLimits:
        return HeaderLimits(
            max_tensors_per_file=self.max_tensors_per_file, max_tensors_per_rank=self.max_tensors_per_rank
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in keys()}


def keys() -> list[dataclasses.Field]:
    """The configuration keys: every field but the internal ones."""
    return [f for f in dataclasses.fields(Config) if not f.metadata.get("internal")]


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


PRELOAD_KEYS = ("name", "path", "version", "alias", "verify", "layout")
_VERIFY_CHOICES: tuple[str, ...] = next(f.metadata["choices"] for f in keys() if f.name == "verify")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` as the key's type, or InvalidArgument naming the key and where the value came from."""
    meta = f.metadata
    kind = meta["kind"]
    where = f"{f.name} ({source})"
    if value is None:
        return None
    if kind == "preload":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise InvalidArgument(f"config: {where} must be a list of tables ([[preload]] with name and path)")
        for v in value:
            if "name" not in v or "path" not in v:
                raise InvalidArgument(f"config: each [[preload]] needs name and path, got {v} ({source})")
            unknown = sorted(set(v) - set(PRELOAD_KEYS))
            if unknown:
                raise InvalidArgument(
                    f"config: [[preload]] {v.get('name')!r} has unknown key(s) {unknown}; known: {list(PRELOAD_KEYS)}"
                    f" ({source})"
                )
            _check_preload(v, source)
        return value
    if kind == "paths":
        items = value.split(":") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise InvalidArgument(f"config: {where} must be a list of directories (DIR:DIR in env and flags)")
        items = [v.strip() for v in items if v.strip()]
        relative = [v for v in items if not v.startswith("/")]
        if relative:
            raise InvalidArgument(f"config: {where} must name absolute directories, got {relative[0]!r}")
        return items
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise InvalidArgument(f"config: {where} must be true or false, got {value!r}")
    if kind == "faults":
        if not isinstance(value, str):
            raise InvalidArgument(f"config: {where} must be a string such as 'load.read:after=2'")
        try:
            FaultPlan.parse(value)
        except HotweightsError as exc:
            raise InvalidArgument(f"config: {where}: {exc.message}") from None
        return value.strip()
    if isinstance(value, bool):  # TOML true where a number or word is expected
        raise InvalidArgument(f"config: {where} must be a {kind}, got {value!r}")
    try:
        if kind == "size":
            out: Any = parse_size(value)
        elif kind == "int":
            if isinstance(value, float) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
                raise ValueError(value)
            out = int(value)
        elif kind == "float":
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
        else:
            if not isinstance(value, str):
                raise ValueError(value)
            out = value.strip()
    except HotweightsError as exc:
        raise InvalidArgument(f"config: {where}: {exc.message}") from None
    except (TypeError, ValueError):
        what = {"size": "size such as 2GiB", "int": "whole number", "float": "finite number", "str": "string"}[kind]
        raise InvalidArgument(f"config: {where} must be a {what}, got {value!r}") from None
    if meta["minimum"] is not None and out < meta["minimum"]:
        raise InvalidArgument(f"config: {where} must be at least {meta['minimum']:g}, got {value!r}")
    if meta["maximum"] is not None and out > meta["maximum"]:
        raise InvalidArgument(f"config: {where} must be at most {meta['maximum']:g}, got {value!r}")
    if meta["choices"]:
        out = meta["aliases"].get(out.lower(), out.lower())
        if out not in meta["choices"]:
            allowed = ", ".join(meta["choices"] + tuple(meta["aliases"]))
            raise InvalidArgument(f"config: {where} must be one of {allowed}; got {value!r}")
    return out


def _check_preload(entry: dict[str, Any], source: str) -> None:
    """The checks a load of ``entry`` would make, now: a bad entry stops the start, not its load after READY."""
    label = f"config: [[preload]] {entry.get('name')!r}"
    for key in PRELOAD_KEYS:
        if key in entry and not isinstance(entry[key], str):
            raise InvalidArgument(f"{label}: {key} must be a string, got {entry[key]!r} ({source})")
    try:
        check_name("model name", entry["name"])
        for key, kind in (("version", "version"), ("alias", "alias")):
            if key in entry:
                check_name(kind, entry[key])
        check_layout(entry.get("layout") or "")
    except HotweightsError as exc:
        raise InvalidArgument(f"{label}: {exc.message} ({source})") from None
    if not entry["path"]:
        raise InvalidArgument(f"{label}: path is empty ({source})")
    choices = _VERIFY_CHOICES
    if "verify" in entry and entry["verify"] not in choices:
        raise InvalidArgument(
            f"{label}: verify must be one of {', '.join(choices)}, got {entry['verify']!r} ({source})"
        )


def _did_you_mean(unknown: list[str], known: Iterable[str]) -> str:
    """' (did you mean X, Y?)' for the names closest to the unknown ones, or '' when none is close."""
    close = [m for k in unknown for m in difflib.get_close_matches(k, sorted(known), n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def config_path(path: str | None, env: Mapping[str, str]) -> str | None:
    """The file to read: ``path`` (a flag), else $HOTWEIGHTS_CONFIG, else the system file if it exists.

    ``none`` as either means no file; None is returned for no file.
    """
    chosen = path or env.get(env_name("config")) or None
    if chosen is not None:
        return None if chosen.strip().lower() == NO_CONFIG else chosen
    return SYSTEM_CONFIG if Path(SYSTEM_CONFIG).is_file() else None


def load_config(
    path: str | None = None, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Builds the config: defaults, then the file, then HOTWEIGHTS_* from ``env`` (default: the
    process's), then ``overrides`` (the flags; None values are not given)."""
    env = os.environ if env is None else env
    fields = {f.name: f for f in keys()}
    values: dict[str, tuple[Any, str]] = {}
    # A typo in the unit's Environment= is refused like one in the file: ignored, it would go unnoticed.
    known = {env_name(n) for n, f in fields.items() if f.metadata["env"]} | {env_name("config")} | CLIENT_ENV
    unknown_env = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if unknown_env:
        hint = _did_you_mean(unknown_env, known)
        raise InvalidArgument(
            f"config: unknown environment variable(s) {unknown_env}{hint}; the daemon reads HOTWEIGHTS_<KEY> for"
            " the keys `hotweights serve --help` lists, and HOTWEIGHTS_CONFIG"
        )
    file = config_path(path, env)
    if file:
        try:
            doc = tomllib.loads(Path(file).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"config file {file} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {file} is not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise InvalidArgument(
                f"config file {file}: unknown key(s) {unknown}{_did_you_mean(unknown, fields)}; known: {sorted(fields)}"
            )
        values.update({k: (v, f"file {file}") for k, v in doc.items()})
    for name, f in fields.items():
        var = env_name(name)
        if f.metadata["env"] and var in env:
            values[name] = (env[var], f"env {var}")
    for name, value in (overrides or {}).items():
        if name not in fields:
            raise InvalidArgument(f"config: unknown key {name!r}; known: {sorted(fields)}")
        if value is not None:
            values[name] = (value, f"flag {flag_name(name)}")
    cfg = Config(**{k: _coerce(fields[k], v, src) for k, (v, src) in values.items()})
    try:
        cfg.loader_settings()  # the loader's own checks, at start rather than at the first load
    except HotweightsError as exc:
        raise InvalidArgument(f"config: {exc.message}") from None
    cfg.socket = cfg.socket or socket_for(env)
    cfg.operator_socket = operator_socket_for(cfg.socket, cfg.operator_socket)
    cfg.config = file or ""
    return cfg
