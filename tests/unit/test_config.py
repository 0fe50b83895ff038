from __future__ import annotations

import pytest

from hotweights import errors
from hotweights.units import format_size, parse_size
from hotweightsd.config import load_config


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(" 1.5 GiB ") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234
    assert format_size(3 * 2**30) == "3.00 GiB"
    with pytest.raises(errors.InvalidArgument, match="cannot read 'lots'"):
        parse_size("lots")


def test_precedence_file_env_flags(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        'socket = "/tmp/a.sock"\nreserve = "1GiB"\nloader_threads = 4\n'
        '[[preload]]\nname = "m"\npath = "/models/m"\nalias = "prod"\n'
    )
    cfg = load_config(str(cfg_file), env={})
    assert cfg.socket == "/tmp/a.sock" and cfg.reserve == 2**30 and cfg.loader_threads == 4
    assert cfg.preload == [{"name": "m", "path": "/models/m", "alias": "prod"}]
    cfg = load_config(str(cfg_file), env={"HOTWEIGHTS_RESERVE": "3GB"})
    assert cfg.reserve == 3 * 10**9
    cfg = load_config(str(cfg_file), {"reserve": "5GB"}, env={"HOTWEIGHTS_RESERVE": "3GB"})
    assert cfg.reserve == 5 * 10**9
    cfg = load_config(str(cfg_file), env={"HOTWEIGHTS_BUSY_CHUNK_SIZE": "32MiB", "HOTWEIGHTS_BACKEND": "cuda"})
    assert cfg.loader_settings().busy_chunk_size == 32 * 2**20


def test_bad_config_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("sockett = 1\n")
    with pytest.raises(errors.InvalidArgument, match=r"unknown key\(s\) \['sockett'\]"):
        load_config(str(bad), env={})
    bad.write_text("backend = 'tpu'\n")
    with pytest.raises(errors.InvalidArgument, match=r"backend \(file .*bad.toml\) must be one of auto, cpu, cuda"):
        load_config(str(bad), env={})
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), env={})


def test_socket_default_rules(monkeypatch):
    from hotweights import paths

    monkeypatch.setenv("HOTWEIGHTS_SOCKET", "/x/y.sock")
    assert paths.default_socket() == "/x/y.sock"
    monkeypatch.delenv("HOTWEIGHTS_SOCKET")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(paths.os.path, "exists", lambda p: False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.default_socket() == "/run/user/1000/hotweights.sock"


def test_backend_stdlib_logs_render_like_the_daemons():
    # In a child process: configuring logging is process-global and would outlive this test.
    import json
    import subprocess
    import sys

    code = (
        "import logging; from hotweightsd.logging import configure; configure('json', 'info'); "
        "logging.getLogger('hotweightsd.cuda').info('rank %d loaded', 3)"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    doc = json.loads(err.strip().splitlines()[-1])
    assert doc["event"] == "rank 3 loaded" and doc["level"] == "info"
    assert doc["logger"] == "hotweightsd.cuda" and "timestamp" in doc
