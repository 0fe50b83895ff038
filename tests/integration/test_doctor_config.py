"""``hotweights doctor --config``: the config judged by the daemon's own rules, relative paths taken
from where the operator stands, and the daemon looked for on the config's socket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hotweights import testing
from support import child_env


def doctor(*args: str, cwd: Path) -> tuple[int, dict[str, dict]]:
    r = subprocess.run(
        [sys.executable, "-m", "hotweights", "doctor", "--json", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=testing.CLI_TIMEOUT * 2,
        env=child_env(),
    )
    return r.returncode, {c["name"]: c for c in json.loads(r.stdout)}


def test_relative_paths_are_read_from_the_current_directory(daemon, tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "ok.toml").write_text('backend = "cpu"\n')
    _, checks = doctor("--socket", daemon.socket, "--config", "ok.toml", "--models", "models/tiny", cwd=tmp_path)
    assert checks["config"]["status"] == "ok", checks["config"]
    assert str(tmp_path / "ok.toml") in checks["config"]["detail"]
    storage = checks[f"storage {tmp_path / 'models' / 'tiny'}"]
    assert "does not exist" not in storage["detail"], storage


def test_a_config_the_daemon_would_refuse_fails_with_the_daemons_message(daemon, tmp_path):
    (tmp_path / "typo.toml").write_text('resrve = "4GiB"\nbackend = "cpu"\n')
    rc, checks = doctor("--socket", daemon.socket, "--config", "typo.toml", cwd=tmp_path)
    assert rc == 1 and checks["config"]["status"] == "fail"
    assert "unknown key(s) ['resrve']" in checks["config"]["detail"], checks["config"]
    (tmp_path / "pre.toml").write_text('[[preload]]\nname = "m"\npath = "/m"\nverify = "bogus"\n')
    rc, checks = doctor("--socket", daemon.socket, "--config", "pre.toml", cwd=tmp_path)
    assert rc == 1 and "verify must be one of none, fast, full" in checks["config"]["detail"], checks["config"]


def test_the_daemon_is_looked_for_on_the_configs_socket(daemon, tmp_path):
    (tmp_path / "sock.toml").write_text(f'socket = "{daemon.socket}"\nbackend = "cpu"\n')
    _, checks = doctor("--config", "sock.toml", cwd=tmp_path)
    assert checks["daemon"]["status"] != "fail", checks["daemon"]
    assert f"pid {daemon.pid}" in checks["daemon"]["detail"]


def test_an_operator_group_that_does_not_exist_fails_the_config_check(daemon, tmp_path):
    (tmp_path / "grp.toml").write_text('operator_group = "no-such-group-hw"\nbackend = "cpu"\n')
    rc, checks = doctor("--socket", daemon.socket, "--config", "grp.toml", cwd=tmp_path)
    assert rc == 1 and checks["config"]["status"] == "fail", checks["config"]
    assert "operator_group 'no-such-group-hw': no such group" in checks["config"]["detail"], checks["config"]
