"""Daemon configuration: defaults < TOML file < HOTWEIGHTS_* environment < command-line flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotweights.errors import InvalidArgument
from hotweights.paths import default_socket
from hotweights.units import parse_size
from hotweightsd.loaders.settings import LoaderSettings

DEFAULT_CONFIG = "/etc/hotweights/config.toml"
_SIZE_KEYS = {"reserve", "memory_limit", "chunk_size", "busy_chunk_size"}


@dataclass
class Config:
    socket: str = ""
    backend: str = "auto"  # auto | cpu | cuda
    reserve: int = 2 * 2**30  # bytes kept free per device (cpu: host memory)
    memory_limit: int | None = None  # cpu backend: cap on resident bytes
    loader_threads: int | None = None
    loader: str = "auto"  # cuda bounce path: auto | pread | odirect | mmap
    chunk_size: int | None = None  # cuda bounce path; None: the backend's measured default
    ring_depth: int | None = None
    busy_chunk_size: int | None = None  # read size while other GPUs load (fewer, larger reads)
    loader_engine: str = "auto"  # cuda bounce path's loop: auto (native where built) | native | python
    gds: str = "auto"  # auto | off | force
    ticket_ttl: float = 30.0
    verify: str = "fast"  # default LoadModel verify level when a manifest exists
    log_format: str = "auto"  # auto | console | json
    log_level: str = "info"
    state_dir: str = ""  # where the fd-store state file lives; "" = beside the socket
    preload: list[dict[str, Any]] = field(default_factory=list)

    def loader_settings(self) -> LoaderSettings:
        return LoaderSettings(
            read_mode=self.loader,
            threads=self.loader_threads,
            chunk_size=self.chunk_size,
            ring_depth=self.ring_depth,
            busy_chunk_size=self.busy_chunk_size,
            engine=self.loader_engine,
            gds=self.gds,
        )


def _coerce(key: str, value: Any, kind: type | str) -> Any:
    if value is None:
        return None
    if key in _SIZE_KEYS:
        return parse_size(value)
    if key == "preload":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise InvalidArgument("config: preload must be a list of tables ([[preload]] with name and path)")
        for v in value:
            if "name" not in v or "path" not in v:
                raise InvalidArgument(f"config: each [[preload]] needs name and path, got {v}")
        return value
    try:
        if "int" in str(kind):
            return int(value)
        if "float" in str(kind):
            return float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"config: {key} must be a number, got {value!r}") from None
    return str(value)


def load_config(
    path: str | None = None, overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    path = path or env.get("HOTWEIGHTS_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise InvalidArgument(f"config file {path}: unknown key(s) {unknown}; known: {sorted(fields)}")
        values.update(doc)
    for name in fields:
        if name == "preload":
            continue
        key = f"HOTWEIGHTS_{name.upper()}"
        if key in env:
            values[name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    cfg = Config(**{k: _coerce(k, v, fields[k].type) for k, v in values.items()})
    if cfg.backend not in ("auto", "cpu", "cuda"):
        raise InvalidArgument(f"backend must be auto, cpu or cuda (got {cfg.backend!r})")
    if cfg.verify not in ("none", "fast", "full"):
        raise InvalidArgument(f"verify must be none, fast or full (got {cfg.verify!r})")
    cfg.socket = cfg.socket or default_socket()
    return cfg
