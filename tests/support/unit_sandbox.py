"""The daemon started as systemd/hotweights.service would start it, without a service manager.

The settings come from the shipped files: User=, Group=, SupplementaryGroups=, UMask=, LimitNOFILE=,
LimitMEMLOCK=, RuntimeDirectory= and RuntimeDirectoryMode= from the unit, the user and groups from
the sysusers file (run through systemd-sysusers into a copy of /etc, so the host's users are never
touched), the config from systemd/config.toml. tests/support/run_like_the_unit.sh applies them inside
`unshare --mount --net`. What a container cannot give without systemd is listed in NOT_APPLIED.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hotweights.testing import CLI_TIMEOUT, Daemon, track
from support import REPO, child_env

UNITS = REPO / "systemd"
SERVICE = UNITS / "hotweights.service"
SYSUSERS = UNITS / "hotweights.sysusers"
CONFIG = UNITS / "config.toml"
SCRIPT = Path(__file__).with_name("run_like_the_unit.sh")
CONFIG_INSIDE = "/run/hotweights-etc/config.toml"
MODELS_INSIDE = "/run/hotweights-models"

# Settings of the unit this emulation does not apply (they need systemd or seccomp).
NOT_APPLIED = (
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "DevicePolicy",
    "DeviceAllow",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "WatchdogSec",
)


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def missing_tools() -> str | None:
    """Why this machine cannot run the emulation, or None."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, another user)"
    for tool in ("unshare", "setpriv", "prlimit", "systemd-sysusers"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: util-linux, systemd)"
    r = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    if r.returncode != 0:
        return f"this machine refuses mount and network namespaces: {r.stderr.strip()}"
    return None


@dataclass
class Account:
    user: str
    group: str
    uid: int
    gid: int
    etc: Path


def make_account(scratch: Path, settings: dict[str, list[str]]) -> Account:
    """The unit's user and groups, created by systemd-sysusers from the shipped file into a copy of /etc."""
    root = scratch / "sysroot"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    conf = root / "usr/lib/sysusers.d/hotweights.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(SYSUSERS, conf)
    r = subprocess.run(["systemd-sysusers", f"--root={root}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    user, group = settings["User"][0], settings["Group"][0]
    uid = gid = -1
    for line in (root / "etc/passwd").read_text().splitlines():
        if line.split(":")[0] == user:
            uid = int(line.split(":")[2])
    for line in (root / "etc/group").read_text().splitlines():
        if line.split(":")[0] == group:
            gid = int(line.split(":")[2])
    assert uid >= 0 and gid >= 0, f"sysusers made no user {user!r} or group {group!r}"
    return Account(user, group, uid, gid, root / "etc")


def kept_dirs(paths: list[str]) -> list[Path]:
    """The folders the daemon must reach (those of ``paths``), none inside another."""
    dirs = sorted({(Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent) for p in paths})
    return [d for d in dirs if not any(d != o and d.is_relative_to(o) for o in dirs)]


def reveals(paths: list[str]) -> list[str]:
    """``HIDDEN|PATH`` for each path that lies below a folder other users may not enter."""
    out = []
    for real in kept_dirs(paths):
        for parent in [*reversed(real.parents)][1:]:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                out.append(f"{parent}|{real}")
                break
    return out


def limit(settings: dict[str, list[str]], key: str) -> str:
    """The unit's Limit<KEY>= for prlimit, or this process's hard limit where that is lower: raising it
    needs CAP_SYS_RESOURCE, which a container's root may lack."""
    import resource

    which = {"LimitNOFILE": resource.RLIMIT_NOFILE, "LimitMEMLOCK": resource.RLIMIT_MEMLOCK}[key]
    hard = resource.getrlimit(which)[1]
    wanted = settings.get(key, ["infinity"])[0]
    if wanted == "infinity":
        return "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return str(int(wanted) if hard == resource.RLIM_INFINITY else min(int(wanted), hard))


def config_without_preload() -> str:
    """The example config as shipped, less its [[preload]] tables (they name models this machine lacks),
    its model_roots the folder where the models are shown (MODELS_INSIDE)."""
    text = CONFIG.read_text()
    text = re.sub(r"(?m)^model_roots = .*$", f'model_roots = ["{MODELS_INSIDE}"]', text)
    return text.split("\n[[preload]]")[0] + "\n"


def start(
    scratch: Path, runtime: Path, models: Path, *extra: str, log: Path
) -> tuple[Daemon, Account, dict[str, list[str]]]:
    """Starts the daemon like the unit; ``runtime`` (a short host path) becomes /run/hotweights, ``models``
    is shown read-only at MODELS_INSIDE. Returns the daemon with its host-side socket."""
    settings = unit_settings(SERVICE.read_text())
    account = make_account(scratch, settings)
    runtime_mode = int(settings.get("RuntimeDirectoryMode", ["0755"])[0], 8)
    os.chown(runtime, account.uid, account.gid)
    os.chmod(runtime, runtime_mode)
    config = scratch / "config.toml"
    config.write_text(config_without_preload())
    config.chmod(0o644)
    runtime_inside = f"/run/{settings['RuntimeDirectory'][0]}"
    binds = [f"{runtime}|{runtime_inside}|rw", f"{models}|{MODELS_INSIDE}|ro", f"{config}|{CONFIG_INSIDE}|ro"]
    keep = [sys.executable, sys.base_prefix, sys.prefix, str(REPO)]
    env = child_env(
        HW_SCRATCH=str(scratch),
        HW_REVEAL=" ".join(reveals(keep)),
        HW_KEEP=" ".join(str(d) for d in kept_dirs(keep)),
        HW_ETC=str(account.etc),
        HW_BINDS=" ".join(binds),
        HW_USER=account.user,
        HW_GROUP=account.group,
        HW_GROUPS=",".join(g for line in settings.get("SupplementaryGroups", []) for g in line.split()),
        HW_UMASK=settings.get("UMask", ["0022"])[0],
        HW_NOFILE=limit(settings, "LimitNOFILE"),
        HW_MEMLOCK=limit(settings, "LimitMEMLOCK"),
        HOME="/",
        USER=account.user,
        LOGNAME=account.user,
    )
    for line in settings.get("Environment", []):
        for assignment in line.split():
            key, _, value = assignment.partition("=")
            env[key] = value
    cmd = [sys.executable, "-m", "hotweights", "serve", "--config", CONFIG_INSIDE, "--backend", "cpu", *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--net", "--", "sh", str(SCRIPT), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    track(proc, "daemon run like the unit")
    socket_name = Path(_config_socket()).name
    return Daemon(str(runtime / socket_name), proc, log, cmd), account, settings


def _config_socket() -> str:
    from hotweightsd.config import load_config

    return load_config(str(CONFIG), env={}).socket
