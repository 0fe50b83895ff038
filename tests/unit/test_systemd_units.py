"""The files in systemd/ checked by systemd's own tools (Debian: `apt-get install -y systemd`).

`systemd-analyze verify` exits 0 even for unknown keys and bad values (it logs them and ignores
them), so these tests read its messages: none may remain but those this systemd is too old for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hotweights.testing import CLI_TIMEOUT
from hotweightsd.config import load_config
from support import REPO
from support.unit_sandbox import unit_settings

UNITS = REPO / "systemd"
SERVICE = UNITS / "hotweights.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install -y systemd)"
)

# Keys the unit uses on purpose that older systemd does not know (and ignores): first version.
NEWER_KEYS = {"FileDescriptorStorePreserve": 254}


def systemd_version() -> int:
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, check=True, timeout=CLI_TIMEOUT).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


def verifiable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart's binary swapped for /bin/true: verify insists that the binary
    exists, and a test machine has no /usr/local/bin/hotweights. Everything else is as shipped."""
    text = SERVICE.read_text() if text is None else text
    text, n = re.subn(r"^ExecStart=/usr/local/bin/hotweights ", "ExecStart=/bin/true ", text, flags=re.M)
    assert n == 1, "ExecStart no longer runs /usr/local/bin/hotweights: update this test"
    out = tmp_path / SERVICE.name
    out.write_text(text)
    return out


def verify_problems(unit: Path) -> list[str]:
    r = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--generators=no", str(unit)], capture_output=True, text=True, timeout=30
    )
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    version = systemd_version()

    def too_new(line: str) -> bool:
        m = re.search(r"Unknown key '(\w+)'", line)
        return bool(m) and version < NEWER_KEYS.get(m.group(1), 0)

    return [f"exit status {r.returncode}"] * (r.returncode != 0) + [ln for ln in lines if not too_new(ln)]


@needs_analyze
def test_service_unit_verifies(tmp_path):
    assert verify_problems(verifiable_copy(tmp_path)) == []


@needs_analyze
def test_verify_reports_what_systemd_would_ignore(tmp_path):
    """The check above can fail: a misspelt key and an unusable device pattern are reported."""
    text = (
        SERVICE.read_text()
        .replace("WatchdogSec=", "WatchdogSecs=")
        .replace("DeviceAllow=char-nvidia* rw", "DeviceAllow=nvidia rw")
    )
    problems = "\n".join(verify_problems(verifiable_copy(tmp_path, text)))
    assert "Unknown key 'WatchdogSecs'" in problems
    assert "Invalid device node path 'nvidia'" in problems


def test_service_unit_keeps_the_lifecycle_and_gpu_settings():
    s = unit_settings(SERVICE.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["FileDescriptorStoreMax"][0]) > 0 and s["FileDescriptorStorePreserve"] == ["yes"]
    assert s["WatchdogSec"] and s["RuntimeDirectory"] == ["hotweights"]
    assert s["Group"] == ["hotweights"] and s["UMask"] == ["0007"]
    # GPU access: the nvidia majors allowed, and nothing that hides /dev.
    assert "char-nvidia* rw" in s["DeviceAllow"]
    assert "PrivateDevices" not in s and "PrivateUsers" not in s


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None,
    reason="systemd-sysusers is not installed (Debian: apt-get install -y systemd)",
)
def test_sysusers_creates_the_user_and_group(tmp_path):
    # Installed where the unit expects it, in an empty root: a dry run parses it and says what
    # it would create; a parse error is only a message naming the file.
    conf = tmp_path / "usr/lib/sysusers.d/hotweights.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(UNITS / "hotweights.sysusers", conf)
    r = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}"], capture_output=True, text=True, timeout=30
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Creating group 'hotweights'" in out and "Creating user 'hotweights'" in out, out
    assert "Creating group 'hotweights-admin'" in out, out  # the operators' group
    assert "hotweights.conf:" not in out, out


def test_example_config_loads_and_agrees_with_the_unit():
    config = UNITS / "config.toml"
    cfg = load_config(str(config), env={})
    assert cfg.preload and all(p["name"] and p["path"] for p in cfg.preload)
    # Loads are confined, and what the example preloads lies under its roots.
    assert cfg.model_roots and all(any(Path(p["path"]).is_relative_to(r) for r in cfg.model_roots) for p in cfg.preload)
    s = unit_settings(SERVICE.read_text())
    runtime = f"/run/{s['RuntimeDirectory'][0]}"
    assert Path(cfg.socket).parent == Path(runtime)
    # The state file must die with the fd store (at reboot): under the runtime directory.
    assert Path(cfg.state_dir).is_relative_to(runtime)
    assert s["ExecStart"][0].endswith("serve --config /etc/hotweights/config.toml")


def test_the_operator_socket_is_for_the_admin_group_the_daemon_is_in():
    """The example config gives the operator socket to a group; the daemon may chgrp its socket only
    to a group it is in (the unit's SupplementaryGroups=), and sysusers creates that group."""
    cfg = load_config(str(UNITS / "config.toml"), env={})
    s = unit_settings(SERVICE.read_text())
    assert cfg.operator_group == "hotweights-admin"
    assert cfg.operator_group in " ".join(s["SupplementaryGroups"]).split()
    assert cfg.operator_group != s["Group"][0]  # readers are not operators
    assert cfg.operator_socket == cfg.socket + ".admin"
    assert Path(cfg.operator_socket).parent == Path(f"/run/{s['RuntimeDirectory'][0]}")
    sysusers = [ln.split()[:2] for ln in (UNITS / "hotweights.sysusers").read_text().splitlines()]
    assert ["g", cfg.operator_group] in sysusers
