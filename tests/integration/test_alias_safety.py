"""Alias safety (cpu backend, a real daemon, the CLI as an operator runs it): a typo'd alias
is NotFound and moves nothing; removing an alias is its own flag; a swap keeps the previous version
resident for a rollback that reads nothing; the kept version goes after its grace; a version retired
while leased comes back retired after a restart and is freed once its last lease ends."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotweights import errors
from hotweights.testing import read_line
from support.ckpt_tools import versioned_model as versioned
from support.daemons import Daemon, serve_command, spawn_client, start_daemon
from support.svcmgr import ServiceManager


def _loads(d: Daemon) -> float:
    """hotweights_loads_total{result="ready"}: the loads that read a checkpoint."""
    text = d.cli("metrics", check=True).stdout
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hotweights_loads_total" and s.labels.get("result") == "ready":
                return s.value
    raise AssertionError(f"no hotweights_loads_total in:\n{text}")


def _versions(d: Daemon) -> dict[str, dict]:
    return {v["version"]: v for v in d.status()["versions"]}


def _aliases(d: Daemon) -> dict[str, str]:
    return {a["alias"]: a["version"] for a in d.status()["aliases"]}


def _two_versions(d: Daemon, tmp_path, alias: str = "prod") -> None:
    d.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", alias, check=True)
    d.cli("load", "llm", str(versioned(tmp_path, 2)), "--version", "v2", check=True)


def test_a_typo_is_not_found_with_the_known_aliases_and_moves_nothing(daemon, tmp_path):
    _two_versions(daemon, tmp_path)
    daemon.cli("alias", "canary", "llm@v1", "--create", check=True)
    loads = _loads(daemon)

    r = daemon.cli("swap", "prdo", "llm@v2")
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert "no alias named 'prdo' (known aliases: canary, prod); pass --create to make a new one" in r.stderr, r.stderr
    assert "create=true" not in r.stderr  # the wire's field, not something a CLI user types
    r = daemon.cli("swap", "prdo", str(versioned(tmp_path, 3)), "--version", "v3")  # a path: nothing is read
    assert r.returncode == 1 and "no alias named 'prdo'" in r.stderr, r.stderr
    r = daemon.cli("alias", "prdo", "llm@v2")
    assert r.returncode == 1 and "no alias named 'prdo'" in r.stderr, r.stderr
    # rollback and alias --remove have no --create: their message does not offer it
    for args in (("rollback", "prdo"), ("alias", "prdo", "--remove")):
        r = daemon.cli(*args)
        assert r.returncode == 1 and "no alias named 'prdo' (known aliases: canary, prod)" in r.stderr, r.stderr
        assert "--create" not in r.stderr, r.stderr
    with daemon.connect() as c:
        with pytest.raises(errors.NotFound) as info:
            c.swap("prdo", "llm@v2")
        assert info.value.details["aliases"] == ["canary", "prod"]
        with pytest.raises(errors.NotFound):
            c.rollback("prdo")

    assert _aliases(daemon) == {"prod": "v1", "canary": "v1"}
    assert set(_versions(daemon)) == {"v1", "v2"} and _loads(daemon) == loads


def test_alias_without_a_target_is_a_usage_error_and_remove_removes(daemon, tmp_path):
    _two_versions(daemon, tmp_path)
    daemon.cli("alias", "canary", "llm@v2", "--create", check=True)

    r = daemon.cli("alias", "canary")
    assert r.returncode == 2 and "missing NAME@VERSION" in r.stderr and "--remove" in r.stderr, r.stderr
    r = daemon.cli("alias", "canary", "llm@v1", "--remove")
    assert r.returncode == 2 and "--remove takes no target" in r.stderr, r.stderr
    assert _aliases(daemon) == {"prod": "v1", "canary": "v2"}

    removed = json.loads(daemon.cli("alias", "canary", "--remove", "--json", check=True).stdout)
    assert removed == {"alias": "canary", "name": "llm", "version": "v2", "removed": True}
    assert _aliases(daemon) == {"prod": "v1"}
    r = daemon.cli("alias", "canary", "--remove")
    assert r.returncode == 1 and "no alias named 'canary' (known aliases: prod)" in r.stderr, r.stderr


def test_swap_keeps_the_previous_version_and_rollback_moves_back_without_a_load(daemon, tmp_path):
    _two_versions(daemon, tmp_path)
    before = _versions(daemon)
    memfds = len(daemon.memfds())

    swapped = json.loads(daemon.cli("swap", "prod", "llm@v2", "--json", check=True).stdout)
    assert swapped["version"] == "v2" and "kept llm@v1 resident" in swapped["previous_note"], swapped
    v = _versions(daemon)
    assert v["v1"]["previous_of"] == "prod" and v["v1"]["retired"] is True and v["v1"]["aliases"] == []
    assert v["v1"]["held_until_unix"] > time.time() + 500  # keep_previous_seconds defaults to 600
    loads = _loads(daemon)

    with daemon.connect() as c:
        r = c.rollback("prod")
    assert (r.alias.alias, r.alias.version, r.old_version) == ("prod", "v1", "v2")
    assert "kept llm@v2 resident" in r.version.previous_note

    after = _versions(daemon)
    assert _aliases(daemon) == {"prod": "v1"}
    # nothing was read or allocated: same versions, same load, same memory
    assert _loads(daemon) == loads and len(daemon.memfds()) == memfds
    assert {k: (x["created_unix"], x["load_seconds"]) for k, x in after.items()} == {
        k: (x["created_unix"], x["load_seconds"]) for k, x in before.items()
    }
    assert after["v1"]["retired"] is False and after["v1"]["held_until_unix"] == 0
    assert after["v2"]["previous_of"] == "prod" and after["v2"]["retired"] is True

    # a second rollback undoes the first, from the command line
    out = daemon.cli("rollback", "prod", check=True).stdout
    assert out.startswith("prod -> llm@v2 (was llm@v1)"), out
    assert _aliases(daemon) == {"prod": "v2"} and _loads(daemon) == loads

    # --no-keep-previous retires at once (nothing leases v1): nothing is left to roll back to
    daemon.cli("swap", "prod", "llm@v1", check=True)  # keeps v2
    r = daemon.cli("swap", "prod", "llm@v2", "--no-keep-previous", "--json", check=True)
    assert "retired llm@v1" in json.loads(r.stdout)["previous_note"]
    assert set(_versions(daemon)) == {"v2"}
    r = daemon.cli("rollback", "prod")
    assert r.returncode == 1 and "no previous version kept resident" in r.stderr, r.stderr


def test_the_kept_version_is_freed_after_keep_previous_seconds(sockdir, tmp_path):
    with start_daemon(str(sockdir / "short.sock"), "--keep-previous-seconds", "1") as d:
        _two_versions(d, tmp_path)
        swapped = json.loads(d.cli("swap", "prod", "llm@v2", "--json", check=True).stdout)
        assert "kept llm@v1 resident for 1s" in swapped["previous_note"], swapped
        st = d.wait_status(lambda s: [v["version"] for v in s["versions"]] == ["v2"], timeout=30)
        assert st["aliases"] == [{"alias": "prod", "name": "llm", "version": "v2"}]
        assert len(d.memfds()) == 1
        r = d.cli("rollback", "prod")
        assert r.returncode == 1 and "no previous version kept resident" in r.stderr, r.stderr
        assert d.stop() == 0, d.logs()


def test_keep_previous_falls_back_to_no_when_memory_is_short(sockdir, tmp_path):
    # two 4 MB versions fit in 10 MB; a third would not: the default does not keep the previous one
    with start_daemon(str(sockdir / "tight.sock"), "--memory-limit", "10MB") as d:
        d.cli("load", "llm", str(versioned(tmp_path, 1, size=1000)), "--version", "v1", "--alias", "prod", check=True)
        d.cli("load", "llm", str(versioned(tmp_path, 2, size=1000)), "--version", "v2", check=True)
        out = d.cli("swap", "prod", "llm@v2", check=True).stdout
        assert "previous: retired llm@v1" in out and "memory is short" in out, out
        assert set(_versions(d)) == {"v2"}
        assert d.stop() == 0, d.logs()


def _served_with_holder(svc: ServiceManager, tmp_path, client: str) -> tuple[list[str], Daemon, Any]:
    """A daemon under the service manager with llm v1 (prod) and v2 loaded, and ``client`` holding prod."""
    sock = str(svc.tmpdir / "hw.sock")
    cmd = serve_command(sock, config="none")
    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = Daemon(sock, svc.process, svc.log_path).wait_ready()
    _two_versions(d, tmp_path)
    holder = spawn_client(client, sock, "prod")
    assert read_line(holder, what='"attached" from the holder').strip() == "attached"
    return cmd, d, holder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_version_retired_while_leased_is_freed_after_a_restart_once_its_lease_ends(svc, tmp_path, sig):
    cmd, d, holder = _served_with_holder(svc, tmp_path, "hold_across_restart")
    d.cli("swap", "prod", "llm@v2", "--no-keep-previous", check=True)
    v = _versions(d)
    assert v["v1"]["retired"] is True and v["v1"]["leases"] == 1

    svc.stop(sig)
    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = Daemon(d.socket, svc.process, svc.log_path).wait_ready()
    st = d.status()
    assert st["restored"] is True, st["restore_note"]
    v = {x["version"]: x for x in st["versions"]}
    assert v["v1"]["retired"] is True and v["v1"]["aliases"] == [], v  # came back retired, not aliased
    assert {a["alias"]: a["version"] for a in st["aliases"]} == {"prod": "v2"}

    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert read_line(holder, what='"same-after-restart" from the holder').split()[0] == "same-after-restart"
    d.wait_status(lambda s: any(le["holder"] == "restart-test" and le["version"] == "v1" for le in s["leases"]))
    assert "v1" in _versions(d)  # leased again: stays
    holder.stdin.write("done\n")
    holder.stdin.flush()
    assert holder.wait(60) == 0, holder.stderr.read()
    d.wait_status(lambda s: [x["version"] for x in s["versions"]] == ["v2"])
    assert sorted(svc.stored_fds) == ["hw/llm@v2/0/0"]
    assert svc.stop() == 0


def test_without_an_fd_store_a_retired_version_is_not_reloaded(sockdir, tmp_path):
    sock = str(sockdir / "plain.sock")
    with start_daemon(sock) as d:
        _two_versions(d, tmp_path)
        holder = spawn_client("hold_across_restart", sock, "prod")
        assert read_line(holder, what='"attached" from the holder').strip() == "attached"
        d.cli("swap", "prod", "llm@v2", check=True)  # v1 is leased and kept for a rollback: retired
        assert _versions(d)["v1"]["retired"] is True
        assert d.stop() == 0, d.logs()
    holder.kill()
    holder.wait(30)
    with start_daemon(sock) as d:
        st = d.wait_status(lambda s: s["versions"])
        assert [(x["version"], x["retired"]) for x in st["versions"]] == [("v2", False)]
        assert "reloading 1 version(s) from storage" in st["restore_note"]
        assert d.stop() == 0, d.logs()


def test_a_holder_that_attached_through_an_alias_hears_of_its_moves_after_a_restart(svc, tmp_path):
    cmd, d, holder = _served_with_holder(svc, tmp_path, "follow_across_restart")
    svc.stop(signal.SIGKILL)
    svc.start(cmd)
    svc.wait_for("READY", "1")
    d = Daemon(d.socket, svc.process, svc.log_path).wait_ready()
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert read_line(holder, what='"relet" from the holder').strip() == "relet"
    # the re-lease holds the version it maps, and still follows the alias it came through
    d.wait_status(lambda s: any(le["holder"] == "follower" and le["version"] == "v1" for le in s["leases"]))
    d.cli("swap", "prod", "llm@v2", check=True)
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert read_line(holder, what='"moved" from the holder').split() == ["moved", "prod", "v1", "v2"]
    assert holder.wait(60) == 0, holder.stderr.read()
    assert svc.stop() == 0


def test_a_lease_that_follows_an_alias_naming_another_version_hears_of_it_at_once(daemon, tmp_path):
    """What a re-lease after a restart asks for: hold NAME@VERSION, follow the alias it came through;
    a move made while the holder was away is reported right after the grant."""
    import os
    import threading

    import grpc

    import hotweights
    from hotweights.wire.pb import pb

    _two_versions(daemon, tmp_path)
    daemon.cli("swap", "prod", "llm@v2", check=True)
    client = hotweights.connect(daemon.socket)
    done = threading.Event()

    def requests(follow: str):
        yield pb.LeaseRequest(open=pb.LeaseOpen(ref="llm@v1", pid=os.getpid(), holder="t", follow=follow))
        done.wait(30)
        yield pb.LeaseRequest(release=pb.LeaseRelease())

    stream = client.stub.Lease(requests("prod"))
    assert next(stream).granted.version == "v1"
    moved = next(stream).alias_moved
    assert (moved.alias, moved.name, moved.old_version, moved.new_version) == ("prod", "llm", "v1", "v2")
    done.set()
    assert list(stream) == []

    done.clear()
    with pytest.raises(grpc.RpcError) as bad:
        next(client.stub.Lease(requests("not an alias!")))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "alias to follow" in bad.value.details()
    done.set()
    client.close()
    assert daemon.wait_status(lambda s: s["leases"] == [])["leases"] == []


def test_a_move_to_another_model_of_the_same_version_string_reaches_the_holder(daemon, tmp_path):
    import os
    import threading

    import hotweights
    from hotweights.wire.pb import pb

    daemon.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
    daemon.cli("load", "other", str(versioned(tmp_path, 2)), "--version", "v1", check=True)
    client = hotweights.connect(daemon.socket)
    done = threading.Event()

    def requests():
        yield pb.LeaseRequest(open=pb.LeaseOpen(ref="prod", pid=os.getpid(), holder="t"))
        done.wait(30)
        yield pb.LeaseRequest(release=pb.LeaseRelease())

    stream = client.stub.Lease(requests())
    granted = next(stream).granted
    assert (granted.name, granted.version) == ("llm", "v1")
    daemon.cli("swap", "prod", "other@v1", check=True)
    moved = next(stream).alias_moved
    assert (moved.alias, moved.name, moved.old_version, moved.new_version) == ("prod", "other", "v1", "v1")
    done.set()
    assert list(stream) == []
    client.close()


def test_a_forced_unload_of_an_alias_target_says_what_it_removed_and_frees_nothing_leased(daemon, tmp_path):
    _two_versions(daemon, tmp_path)
    daemon.cli("swap", "prod", "llm@v2", check=True)  # llm@v1 kept as the previous of prod
    assert _versions(daemon)["v1"]["previous_of"] == "prod"
    holder = spawn_client("hold_prod", daemon.socket)
    try:
        assert read_line(holder, what='"v2" from the holder').split()[0] == "v2"
        r = daemon.cli("unload", "llm@v2", "--force", check=True)
        assert r.stdout.splitlines()[0] == "unloaded llm@v2 (0 B)", r.stdout  # the lease still maps it
        assert "removed alias(es) prod" in r.stdout, r.stdout
        assert "retired llm@v1, kept for their rollback" in r.stdout, r.stdout
        assert "llm@v2: 1 live lease(s) still map its memory; it is freed when they end" in r.stdout, r.stdout
        # nothing stays kept for a rollback that can no longer happen
        assert _aliases(daemon) == {} and "v1" not in _versions(daemon)
        out, err = holder.communicate("\n\n", timeout=30)
        assert out.splitlines()[-1] == "released", out + err
    finally:
        holder.kill()
