"""No test daemon reads the node's /etc/hotweights/config.toml.

The daemon reads its system config file only when neither ``--config`` nor ``HOTWEIGHTS_CONFIG``
names one; the harness says ``none``. To prove it on a real daemon process, the system path is
pointed at a poisoned file (through a sitecustomize that the child imports at start) that a daemon
reading it refuses to start with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import child_env
from support.daemons import start_daemon

POISON = "poisoned_by_test = true\n"  # an unknown key: a daemon that reads it stops with its name


def poisoned_env(tmp_path: Path) -> dict[str, str]:
    system = tmp_path / "system-config.toml"
    system.write_text(POISON)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import hotweightsd.config as _config\n_config.SYSTEM_CONFIG = {str(system)!r}\n"
    )
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


def test_a_daemon_started_by_the_harness_does_not_read_the_system_config(sockdir, tmp_path):
    d = start_daemon(str(sockdir / "hw.sock"), env=poisoned_env(tmp_path))
    try:
        assert d.status()["backend"] == "cpu"
        assert "poisoned_by_test" not in d.logs()
    finally:
        assert d.stop() == 0, d.logs()


def test_the_poison_works_on_a_daemon_told_nothing(sockdir, tmp_path):
    env = poisoned_env(tmp_path)
    env.pop("HOTWEIGHTS_CONFIG", None)
    r = subprocess.run(
        [sys.executable, "-m", "hotweights", "serve", "--socket", str(sockdir / "hw.sock"), "--backend", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "poisoned_by_test" in r.stderr, r.stderr
