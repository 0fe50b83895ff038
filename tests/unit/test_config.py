from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from hotweights import errors, testing
from hotweights.units import format_size, parse_size
from hotweightsd import cli, config
from hotweightsd.config import Config, env_name, flag_name, keys, load_config
from hotweightsd.loaders.settings import LoaderSettings
from support.daemons import run_cli


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


def test_a_preload_table_with_an_unknown_key_or_layout_is_refused_naming_it(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[[preload]]\nname = "m"\npath = "/models/m"\nlayout = "vllm"\n')
    assert load_config(str(cfg_file), env={}).preload == [{"name": "m", "path": "/models/m", "layout": "vllm"}]
    cfg_file.write_text('[[preload]]\nname = "m"\npath = "/models/m"\nlayuot = "vllm"\n')
    with pytest.raises(errors.InvalidArgument, match=r"\[\[preload\]\] 'm' has unknown key\(s\) \['layuot'\]"):
        load_config(str(cfg_file), env={})
    cfg_file.write_text('[[preload]]\nname = "m"\npath = "/models/m"\nlayout = "tgi"\n')
    with pytest.raises(errors.InvalidArgument, match="unknown layout 'tgi'"):
        load_config(str(cfg_file), env={})


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
    # the daemon's config hands the rules its own environment, not the process's
    assert paths.socket_for({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7/hotweights.sock"
    assert load_config("none", env={"XDG_RUNTIME_DIR": "/run/user/7"}).socket == "/run/user/7/hotweights.sock"


# ---- one typed config ------------------------------------------------------------------------


def test_every_key_is_a_flag_of_serve_but_preload():
    options = {o for a in cli.parser()._actions for o in a.option_strings}
    flagged = {f.name for f in keys() if flag_name(f.name) in options}
    assert flagged == {f.name for f in keys()} - {"preload"}
    assert {"--config", "--print-config", "-s"} <= options
    # booleans both ways
    assert {"--no-share-cores"} <= options


def test_each_layer_overrides_the_one_below_for_every_kind_of_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('gds = "off"\nshare_cores = false\nticket_ttl = 5\nchunk_size = "8MiB"\nring_depth = 3\n')
    env = {"HOTWEIGHTS_GDS": "compat", "HOTWEIGHTS_SHARE_CORES": "yes", "HOTWEIGHTS_CHUNK_SIZE": "16MiB"}
    assert Config().share_cores is True and Config().gds == "auto"
    cfg = load_config(str(f), env={})
    assert (cfg.gds, cfg.share_cores, cfg.ticket_ttl, cfg.chunk_size, cfg.ring_depth) == (
        "off",
        False,
        5.0,
        8 * 2**20,
        3,
    )
    cfg = load_config(str(f), env=env)
    assert (cfg.gds, cfg.share_cores, cfg.chunk_size, cfg.ring_depth) == ("compat", True, 16 * 2**20, 3)
    cfg = load_config(str(f), {"gds": "force", "share_cores": False, "chunk_size": "1MiB"}, env=env)
    assert (cfg.gds, cfg.share_cores, cfg.chunk_size) == ("on", False, 2**20)  # force is on's alias
    assert cfg.config == str(f)


def test_flags_reach_the_config_through_the_command_line():
    r = run_cli(
        *["--config", "none", "--print-config", "-s", "/tmp/x.sock"],
        *["--reserve", "1GiB", "--no-share-cores", "--loader", "odirect", "--state-dir", "/tmp/st"],
        module="hotweightsd",
        env={"HOTWEIGHTS_LOADER_THREADS": "6", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["socket"] == "/tmp/x.sock" and doc["reserve"] == 2**30 and doc["share_cores"] is False
    assert doc["loader"] == "odirect" and doc["state_dir"] == "/tmp/st" and doc["loader_threads"] == 6
    assert doc["config"] == ""


def test_errors_name_the_key_and_where_the_value_came_from(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('reserve = "lots"\n')
    with pytest.raises(errors.InvalidArgument, match=r"reserve \(file .*c.toml\): cannot read 'lots'"):
        load_config(str(f), env={})
    with pytest.raises(errors.InvalidArgument, match=r"reserve \(env HOTWEIGHTS_RESERVE\)"):
        load_config("none", env={"HOTWEIGHTS_RESERVE": "lots"})
    with pytest.raises(errors.InvalidArgument, match=r"reserve \(flag --reserve\)"):
        load_config("none", {"reserve": "lots"}, env={})
    with pytest.raises(
        errors.InvalidArgument, match=r"loader \(env HOTWEIGHTS_LOADER\) must be one of auto, pread, odirect"
    ):
        load_config("none", env={"HOTWEIGHTS_LOADER": "mmap"})  # mmap mode is gone
    with pytest.raises(errors.InvalidArgument, match=r"loader_threads \(flag --loader-threads\) must be at least 1"):
        load_config("none", {"loader_threads": "0"}, env={})
    with pytest.raises(
        errors.InvalidArgument, match=r"ring_depth \(env HOTWEIGHTS_RING_DEPTH\) must be a whole number"
    ):
        load_config("none", env={"HOTWEIGHTS_RING_DEPTH": "2.5"})
    with pytest.raises(
        errors.InvalidArgument, match=r"share_cores \(env HOTWEIGHTS_SHARE_CORES\) must be true or false"
    ):
        load_config("none", env={"HOTWEIGHTS_SHARE_CORES": "maybe"})
    f.write_text("log_level = true\n")
    with pytest.raises(errors.InvalidArgument, match=r"log_level \(file .*\) must be a str"):
        load_config(str(f), env={})


def test_the_command_line_reports_a_bad_value_and_exits_2():
    r = run_cli("serve", "--config", "none", "--gds", "sometimes")
    assert r.returncode == 2
    assert "gds (flag --gds) must be one of auto, off, on, compat, force; got 'sometimes'" in r.stderr


def test_the_loader_gets_every_setting_it_has_from_the_config():
    # a setting the loader drops must leave the config too, and the reverse
    assert set(config.LOADER_KEYS) == {f.name for f in dataclasses.fields(LoaderSettings)}
    assert set(config.LOADER_KEYS.values()) <= {f.name for f in keys()}
    flags = {
        "loader": "odirect",
        "loader_threads": 3,
        "chunk_size": "2MiB",
        "ring_depth": 5,
        "busy_chunk_size": "32MiB",
        "read_order": "streams",
        "loader_engine": "python",
        "gds": "off",
        "share_cores": False,
        "native_lib": "/opt/hw/lib.so",
        "direct_read_size": "1MiB",
        "direct_chunk_size": "256KiB",
        "ring_memory": "huge",
    }
    cfg = load_config("none", {k: v for k, v in flags.items() if k in config.LOADER_KEYS.values()}, env={})
    got, default = cfg.loader_settings(), LoaderSettings()
    for setting, key in config.LOADER_KEYS.items():
        assert getattr(got, setting) == getattr(cfg, key) != getattr(default, setting), setting


def test_unknown_hotweights_variables_are_refused_like_an_unknown_file_key():
    with pytest.raises(
        errors.InvalidArgument,
        match=r"unknown environment variable\(s\) \['HOTWEIGHTS_RESREVE'\] \(did you mean HOTWEIGHTS_RESERVE\?\)",
    ):
        load_config("none", env={"HOTWEIGHTS_RESREVE": "1GiB"})
    with pytest.raises(errors.InvalidArgument, match="HOTWEIGHTS_PRELOAD"):  # a file-only key
        load_config("none", env={"HOTWEIGHTS_PRELOAD": "x"})
    # the client's own variables may share the daemon's environment
    cfg = load_config("none", env={f: "1" for f in config.CLIENT_ENV})
    assert cfg.loader == "auto"


def test_serve_refuses_an_unknown_variable_and_exits_2():
    r = run_cli("serve", "--config", "none", "--print-config", HOTWEIGHTS_RESREVE="1GiB")
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith("hotweights serve: config: unknown environment variable(s) ['HOTWEIGHTS_RESREVE']")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("key", [f.name for f in keys() if f.metadata["kind"] == "float"])
def test_a_float_key_takes_only_finite_numbers(key, value):
    with pytest.raises(errors.InvalidArgument, match=rf"{key} \(env {env_name(key)}\) must be a finite number"):
        load_config("none", env={env_name(key): value})


def test_time_keys_have_an_upper_bound(tmp_path):
    for f in keys():
        if f.metadata["kind"] == "float":
            assert f.metadata["maximum"] is not None, f.name
    with pytest.raises(errors.InvalidArgument, match=r"ticket_ttl \(flag --ticket-ttl\) must be at most 86400"):
        load_config("none", {"ticket_ttl": "1e9"}, env={})
    f = tmp_path / "c.toml"
    f.write_text("metrics_interval = nan\n")  # TOML's own nan
    with pytest.raises(errors.InvalidArgument, match=r"metrics_interval \(file .*c.toml\) must be a finite number"):
        load_config(str(f), env={})
    assert load_config("none", {"keep_previous_seconds": "3600"}, env={}).keep_previous_seconds == 3600.0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "m"\npath = "/m"\nalias = ["a"]', r"'m': alias must be a string, got \['a'\]"),
        ('name = 5\npath = "/m"', r"5: name must be a string, got 5"),
        ('name = "m"\npath = "/m"\nverify = "bogus"', r"'m': verify must be one of none, fast, full, got 'bogus'"),
        ('name = "m m"\npath = "/m"', r"'m m': invalid model name 'm m'"),
        ('name = "m"\npath = "/m"\nversion = "v/1"', r"'m': invalid version 'v/1'"),
        ('name = "m"\npath = "/m"\nalias = "-prod"', r"'m': invalid alias '-prod'"),
        ('name = "m"\npath = ""', r"'m': path is empty"),
        ('name = "m"\npath = "/m"\nlayout = 1', r"'m': layout must be a string"),
    ],
)
def test_a_bad_preload_entry_stops_the_start(tmp_path, entry, message):
    f = tmp_path / "c.toml"
    f.write_text(f"[[preload]]\n{entry}\n")
    with pytest.raises(errors.InvalidArgument, match=r"\[\[preload\]\] " + message):
        load_config(str(f), env={})
    r = run_cli("serve", "--config", str(f), "--print-config")
    assert r.returncode == 2 and r.stderr.startswith("hotweights serve: config: [[preload]]"), r.stderr


def test_every_key_is_read_from_its_environment_variable():
    sample = {
        "size": "3MiB",
        "int": "7",
        "float": "1.5",
        "bool": "0",
        "str": "/x",
        "paths": "/x:/y",
        "faults": "load.read",
    }
    env = {}
    for f in keys():
        if f.name != "preload":
            meta = f.metadata
            env[env_name(f.name)] = meta["choices"][-1] if meta["choices"] else sample[meta["kind"]]
    cfg = load_config("none", env=env)
    unchanged = [f.name for f in keys() if f.name != "preload" and getattr(cfg, f.name) == getattr(Config(), f.name)]
    assert unchanged == []


# ---- the system config file ------------------------------------------------------------------


def test_the_system_file_is_read_only_when_nothing_else_is_said(tmp_path, monkeypatch):
    poison = tmp_path / "system.toml"
    poison.write_text("poisoned_by_test = true\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(poison))
    # the control: with nothing said, the system file is read (and its unknown key refused)
    with pytest.raises(errors.InvalidArgument, match="poisoned_by_test"):
        load_config(env={})
    # what tests and the harness say: no file at all
    assert load_config("none", env={}).config == ""
    assert load_config(env={"HOTWEIGHTS_CONFIG": "none"}).config == ""
    assert load_config(env={"HOTWEIGHTS_CONFIG": "NONE"}).config == ""
    own = tmp_path / "own.toml"
    own.write_text('backend = "cpu"\n')
    assert load_config(env={"HOTWEIGHTS_CONFIG": str(own)}).config == str(own)
    assert load_config(str(own), env={"HOTWEIGHTS_CONFIG": "none"}).backend == "cpu"  # the flag wins
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(tmp_path / "absent.toml"))
    assert load_config(env={}).config == ""


def test_the_reserve_default_is_defined_once():
    import inspect

    from hotweightsd.backends import create_backend

    assert Config().reserve == config.DEFAULT_RESERVE == 2 * 2**30
    # the backends take it from the config: create_backend has no default of its own
    assert inspect.signature(create_backend).parameters["reserve"].default is inspect.Parameter.empty


def test_backend_stdlib_logs_render_like_the_daemons():
    # In a child process: configuring logging is process-global and would outlive this test.
    import json
    import sys

    code = (
        "import logging; from hotweightsd.logging import configure; configure('json', 'info'); "
        "logging.getLogger('hotweightsd.cuda').info('rank %d loaded', 3)"
    )
    err = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=testing.CLI_TIMEOUT
    ).stderr
    doc = json.loads(err.strip().splitlines()[-1])
    assert doc["event"] == "rank 3 loaded" and doc["level"] == "info"
    assert doc["logger"] == "hotweightsd.cuda" and "timestamp" in doc


@pytest.mark.parametrize("where", ["flag", "file"])
def test_print_config_refuses_an_operator_group_that_does_not_exist(tmp_path, where):
    """``--print-config`` (and so doctor) must refuse what ``serve`` refuses, with its message."""
    f = tmp_path / "c.toml"
    f.write_text('operator_group = "no-such-group-hw"\n' if where == "file" else "")
    extra = ["--operator-group", "no-such-group-hw"] if where == "flag" else []
    r = run_cli("serve", "--config", str(f), *extra, "--print-config")
    assert r.returncode == 2, r.stdout
    assert r.stderr.strip() == "hotweights serve: operator_group 'no-such-group-hw': no such group", r.stderr


def test_print_config_takes_an_operator_group_that_exists(tmp_path):
    r = run_cli("serve", "--config", "none", "--operator-group", "0", "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["operator_group"] == "0"


def test_a_typo_in_the_file_gets_a_did_you_mean(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('reserv = "1GiB"\n')
    typo = r"unknown key\(s\) \['reserv'\] \(did you mean reserve\?\); known: "
    with pytest.raises(errors.InvalidArgument, match=typo):
        load_config(str(f), env={})
    f.write_text("zzzzzz = 1\n")  # nothing close: no guess
    with pytest.raises(errors.InvalidArgument, match=r"unknown key\(s\) \['zzzzzz'\]; known: "):
        load_config(str(f), env={})
