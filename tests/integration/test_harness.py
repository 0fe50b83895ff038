"""hotweights.testing with a real daemon: what it reports when a start fails, which config the
daemon reads, and that nothing it started outlives a forgetful caller."""

from __future__ import annotations

import pytest

from hotweights import testing
from support.daemons import start_daemon


def test_a_daemon_that_exits_at_start_is_reported_with_its_log_and_not_left(sockdir):
    before = testing.tracked()
    with pytest.raises(AssertionError, match="exited with 2") as info:
        start_daemon(str(sockdir / "bad.sock"), "--memory-limit", "lots")
    assert "cannot read 'lots' as a size" in str(info.value)  # the daemon's own words, from its log
    assert testing.tracked() == before


def test_a_started_daemon_reads_no_config_not_the_hosts(sockdir, tmp_path):
    host = tmp_path / "host-config.toml"
    host.write_text("this is [not toml\n")
    env = {"HOTWEIGHTS_CONFIG": str(host)}
    with start_daemon(str(sockdir / "own.sock"), extra_env=env) as d:
        assert d.status()["versions"] == []
        assert d.stop() == 0, d.logs()
    # the same environment without the harness's --config none: the daemon reads the host's and refuses
    with pytest.raises(AssertionError, match="not valid TOML"):
        start_daemon(str(sockdir / "host.sock"), extra_env=env, config=None)


def test_kill_leftovers_ends_a_daemon_nobody_stopped(sockdir):
    d = start_daemon(str(sockdir / "left.sock"))
    assert testing.kill_leftovers([d.pid]) == {d.pid: f"daemon on {d.socket}"}
    assert not d.alive() and d.pid not in testing.tracked()
