"""The daemon's command line (``hotweights serve``, ``hotweightsd``, ``python -m hotweightsd``).

Flags -> ``Config`` -> ``main.run``. The flags are built from the config's keys, so every key that
fits on a command line is a flag (``preload``, a list of tables, is the exception: file only).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hotweights.errors import HotweightsError
from hotweightsd.config import NO_CONFIG, SYSTEM_CONFIG, Config, env_name, flag_name, keys, load_config
from hotweightsd.server.sockets import existing_group


def _default(value: object) -> str:
    if value is None or value == "":
        return "automatic"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hotweights serve",
        description="Run the hotweights daemon in the foreground (systemd runs this).",
        epilog=(
            "Each value comes from, in rising order: its default, the TOML file, the HOTWEIGHTS_<KEY> "
            "environment variable, the flag. Sizes read like 2GiB, 512MiB, 16GB or a number of bytes."
        ),
    )
    p.add_argument(
        "--config",
        "-c",
        metavar="PATH|none",
        help=f"TOML config file; default {SYSTEM_CONFIG} where it exists; '{NO_CONFIG}': read no file "
        f"(env {env_name('config')})",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    defaults = Config()
    for f in keys():
        meta = f.metadata
        if not meta["flag"]:
            continue
        names = [flag_name(f.name), *(["-s"] if f.name == "socket" else [])]
        text = f"{meta['help']} (env {env_name(f.name)}; default {_default(getattr(defaults, f.name))})"
        if meta["kind"] == "bool":
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = meta["metavar"] or ("|".join(meta["choices"]) if meta["choices"] else meta["kind"].upper())
            p.add_argument(*names, dest=f.name, default=None, metavar=metavar, help=text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    overrides = {f.name: getattr(args, f.name) for f in keys() if f.metadata["flag"]}
    try:
        cfg = load_config(args.config, overrides)
        # Here, not in load_config: a config may be read on a host other than the one it is for (the
        # example unit's names a group that only its sysusers file creates); a start needs the group.
        if cfg.operator_group:
            existing_group(cfg.operator_group)
    except HotweightsError as exc:
        print(f"hotweights serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps({**cfg.as_dict(), "config": cfg.config}, indent=2))
        return 0
    from hotweightsd.main import run  # the daemon's imports (grpc, backends) only when it runs

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
