"""The model lifecycle (cpu backend): versions, aliases, live swap, watch, leases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hotweights import testing
from hotweights.testing import read_line
from support import child_env
from support.ckpt_tools import versioned_model as versioned
from support.daemons import run_client, spawn_client, start_daemon, wait_until


def test_swap_keeps_old_readers_moves_alias_tells_watchers_and_frees_after_release(daemon, tmp_path):
    v1, v2 = versioned(tmp_path, 1), versioned(tmp_path, 2)
    daemon.cli("load", "llm", str(v1), "--version", "v1", "--alias", "prod", check=True)
    holder = spawn_client("hold_prod", daemon.socket)
    assert read_line(holder, what='"v1" from the holder').split() == ["v1", "1"]
    watcher = spawn_client("watch_alias", daemon.socket, "prod")
    assert read_line(watcher, what='"watching" from the watcher').strip() == "watching"

    # --no-keep-previous: v1 goes with its last lease (tests/integration/test_alias_safety.py keeps it)
    r = daemon.cli("swap", "prod", str(v2), "--version", "v2", "--no-keep-previous", "--json", check=True)
    assert json.loads(r.stdout)["version"] == "v2"

    out, _ = watcher.communicate(timeout=testing.WAIT_TIMEOUT)  # the watcher ends after the move
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[-1] == "ALIAS_MOVED" and "VERSION_READY" in kinds, kinds
    assert any(e["kind"] == "VERSION_READY" and e["version"] == "v2" for e in events), events
    moved = events[-1]
    assert moved["version"] == "v2" and moved["alias"] == "prod"

    # the old reader still reads v1, while a new attach gets v2
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert read_line(holder, what='"v1" from the holder').split() == ["v1", "1", "1.0"]
    new = run_client("attach_version", daemon.socket, "prod")
    assert new.stdout.split() == ["v2", "2"]

    # v1 stays until its last lease ends, then goes
    listed = {v["version"]: v for v in json.loads(daemon.cli("list", "--json", check=True).stdout)["versions"]}
    assert set(listed) == {"v1", "v2"} and listed["v1"]["leases"] == 1
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert read_line(holder, what='"released" from the holder').strip() == "released"
    st = daemon.wait_status(lambda s: len(s["versions"]) == 1)
    assert [v["version"] for v in st["versions"]] == ["v2"]
    assert len(daemon.memfds()) == 1


def test_swap_to_name_at_version_and_alias_commands(daemon, tmp_path):
    daemon.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
    daemon.cli("load", "llm", str(versioned(tmp_path, 2)), "--version", "v2", check=True)
    daemon.cli("swap", "prod", "llm@v2", "--no-keep-previous", check=True)
    st = daemon.status()
    assert st["aliases"] == [{"alias": "prod", "name": "llm", "version": "v2"}]
    assert [v["version"] for v in st["versions"]] == ["v2"]  # v1 had no lease: retired at once
    daemon.cli("alias", "canary", "llm@v2", "--create", check=True)
    assert {a["alias"] for a in daemon.status()["aliases"]} == {"prod", "canary"}


def test_swap_failure_leaves_alias_in_place(daemon, tmp_path):
    daemon.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    r = daemon.cli("swap", "prod", str(broken), "--version", "v2")
    assert r.returncode == 1 and "not valid JSON" in r.stderr
    st = daemon.status()
    assert st["aliases"] == [{"alias": "prod", "name": "llm", "version": "v1"}]
    assert [(v["version"], v["state"]) for v in st["versions"]] == [("v1", "READY")]


def test_side_by_side_refused_when_both_cannot_fit_then_drain_works(sockdir, tmp_path):
    # room for one 4 MB version, not two
    d = start_daemon(str(sockdir / "tight.sock"), "--memory-limit", "6MB")
    try:
        v1, v2 = versioned(tmp_path, 1, size=1000), versioned(tmp_path, 2, size=1000)
        d.cli("load", "llm", str(v1), "--version", "v1", "--alias", "prod", check=True)
        r = d.cli("swap", "prod", str(v2), "--version", "v2")
        assert r.returncode == 1 and "--mode drain" in r.stderr and "does not fit" in r.stderr

        holder = spawn_client("hold_prod", d.socket)
        assert read_line(holder, what='"v1" from the holder').split() == ["v1", "1"]
        # drain times out cleanly while the lease lives: nothing changes
        r = d.cli("swap", "prod", str(v2), "--version", "v2", "--mode", "drain", "--drain-timeout", "0.5")
        assert r.returncode == 1 and "timed out" in r.stderr and "nothing was changed" in r.stderr
        st = d.status()
        assert [(v["version"], v["state"]) for v in st["versions"]] == [("v1", "READY")]
        assert st["aliases"][0]["version"] == "v1"

        # with the lease released during the drain, the swap completes
        swap = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hotweights",
                "swap",
                "prod",
                str(v2),
                "--version",
                "v2",
                "--mode",
                "drain",
                "--drain-timeout",
                "30",
                "--socket",
                d.socket,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        testing.track(swap, "hotweights swap --mode drain")
        d.wait_status(lambda s: s["versions"][0]["state"] == "DRAINING")
        holder.stdin.write("go\ngo\n")
        holder.stdin.flush()
        out, err = swap.communicate(timeout=120)
        assert swap.returncode == 0, err
        st = d.status()
        assert [(v["version"], v["state"]) for v in st["versions"]] == [("v2", "READY")]
        assert st["aliases"][0]["version"] == "v2"
    finally:
        assert d.stop() == 0


def test_bad_lifecycle_requests_are_clear_errors(daemon, tmp_path):
    daemon.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
    r = daemon.cli("swap", "prod", "llm@v9")
    assert r.returncode == 1 and "llm@v9 is not loaded" in r.stderr
    r = daemon.cli("unload", "llm@v1")
    assert r.returncode == 1 and "target of alias(es) prod" in r.stderr
    r = daemon.cli("alias", "llm", "llm@v1")
    assert r.returncode == 1 and "aliases and model names must differ" in r.stderr
    r = daemon.cli("swap", "nosuch", str(versioned(tmp_path, 2)))
    assert r.returncode == 1 and "no alias named 'nosuch' (known aliases: prod)" in r.stderr
    r = daemon.cli("swap", "nosuch", str(versioned(tmp_path, 2)), "--create")
    assert r.returncode == 1 and "pass the model name" in r.stderr
    r = daemon.cli("load", "llm", str(versioned(tmp_path, 2)), "--version", "v1")  # other content, same version
    assert r.returncode == 1 and "llm@v1 is already loaded (READY)" in r.stderr and "different content" in r.stderr
    r = daemon.cli("swap", "prod", "llm")
    assert r.returncode == 1 and "neither NAME@VERSION nor a checkpoint path" in r.stderr


@pytest.mark.slow
def test_sixteen_clients_churn_through_twenty_swaps(daemon, tmp_path):
    paths = [versioned(tmp_path, n, size=128) for n in range(1, 22)]
    daemon.cli("load", "llm", str(paths[0]), "--version", "v1", "--alias", "prod", check=True)
    one_version = int(daemon.status()["resident_bytes"])
    stop = tmp_path / "stop"
    clients = [spawn_client("churn_attach", daemon.socket, str(stop)) for _ in range(16)]
    for p in clients:  # sixteen interpreters start at once: the first line may take a while
        assert read_line(p, testing.CLI_TIMEOUT, '"started" from the client').strip() == "started"
    for n in range(2, 22):
        daemon.cli("swap", "prod", str(paths[n - 1]), "--version", f"v{n}", "--no-keep-previous", check=True)
        # the clients churn through each version before the next swap
        wait_until(lambda n=n: any(le.version == f"v{n}" for le in daemon.leases()), what=f"a client to attach v{n}")
    stop.touch()
    results = []
    for p in clients:
        out, err = p.communicate(timeout=240)
        results.append(out)
        assert p.returncode == 0, err
    fails = [line for out in results for line in out.splitlines() if line.startswith("FAIL")]
    assert fails == []
    done = [line.split() for out in results for line in out.splitlines() if line.startswith("DONE")]
    assert len(done) == 16 and all(int(d[1]) > 0 and d[2] == "0" for d in done)
    st = daemon.wait_status(lambda s: not s["leases"] and len(s["versions"]) == 1)
    assert st["leases"] == []
    assert [v["version"] for v in st["versions"]] == ["v21"]
    assert int(st["resident_bytes"]) == one_version
    assert len(daemon.memfds()) == 1


def test_config_preload_loads_models_and_aliases_at_start(sockdir, tmp_path):
    ckpt = versioned(tmp_path, 3)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[[preload]]\nname = "llm"\npath = "{ckpt}"\nversion = "v3"\nalias = "prod"\n'
        f'[[preload]]\nname = "broken"\npath = "{tmp_path / "missing"}"\n'
    )
    d = start_daemon(str(sockdir / "pre.sock"), config=cfg)
    try:
        st = d.wait_status(lambda s: s["versions"])
        assert [(v["name"], v["version"], v["state"]) for v in st["versions"]] == [("llm", "v3", "READY")]
        assert st["aliases"] == [{"alias": "prod", "name": "llm", "version": "v3"}]
        assert d.alive()  # a preload that fails is logged, not fatal
        assert "preload.failed" in d.logs() and "missing" in d.logs()
        # ... and shown to the operator, who would otherwise see a healthy daemon
        (failure,) = d.wait_status(lambda s: s.get("start_failures"))["start_failures"]
        assert failure.startswith(f"preload broken from {tmp_path / 'missing'}: "), failure
        text = d.cli("status", check=True).stdout
        assert f"failed at start: preload broken from {tmp_path / 'missing'}: " in text, text
    finally:
        assert d.stop() == 0


def test_a_reload_at_start_that_fails_is_shown_in_status(sockdir, tmp_path):
    ckpt = versioned(tmp_path, 1)
    sock = str(sockdir / "re.sock")
    d = start_daemon(sock)
    try:
        d.cli("load", "llm", str(ckpt), "--version", "v1", check=True)
    finally:
        assert d.stop() == 0
    ckpt.unlink()  # no fd store here: the next start reloads from storage, and finds nothing
    d = start_daemon(sock)
    try:
        (failure,) = d.wait_status(lambda s: s.get("start_failures"))["start_failures"]
        assert failure.startswith(f"reload llm@v1 from {ckpt}: "), failure
    finally:
        assert d.stop() == 0


def test_an_alias_a_failed_drain_swap_left_naming_nothing_is_shown_at_the_next_start(sockdir, tmp_path):
    sock = str(sockdir / "dr.sock")
    d = start_daemon(sock, "--faults", "load.verify:after=1")  # the second load fails its last stage
    try:
        d.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
        r = d.cli("swap", "prod", str(versioned(tmp_path, 2)), "--version", "v2", "--mode", "drain")
        assert r.returncode != 0 and "injected fault" in r.stderr, r.stderr
    finally:
        assert d.stop() == 0
    d = start_daemon(sock)
    try:
        (failure,) = d.wait_status(lambda s: s.get("start_failures"))["start_failures"]
        assert failure.startswith("alias 'prod' named llm@v1, of which the state file holds no version"), failure
        assert "hotweights swap prod PATH --create --name llm" in failure
        # doing what the line says clears it
        d.cli("swap", "prod", str(versioned(tmp_path, 3)), "--version", "v3", "--create", "--name", "llm", check=True)
        d.wait_status(lambda s: not s.get("start_failures"))
    finally:
        assert d.stop() == 0


def test_a_failure_at_start_leaves_status_once_the_operator_loads_what_it_names(sockdir, tmp_path):
    # The preloads' files are missing at start; the operator then makes them and loads each as doctor's fix
    # line says. Before, the lines stayed in status (and doctor FAILed) until the next restart.
    ckpt, unversioned = tmp_path / "v1" / "model.safetensors", tmp_path / "v2" / "model.safetensors"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[[preload]]\nname = "llm"\npath = "{ckpt}"\nversion = "v1"\nalias = "prod"\n'
        f'[[preload]]\nname = "other"\npath = "{unversioned}"\n'
    )
    d = start_daemon(str(sockdir / "fix.sock"), config=cfg)
    try:
        d.wait_status(lambda s: len(s.get("start_failures", ())) == 2)
        assert versioned(tmp_path, 1) == ckpt and versioned(tmp_path, 2) == unversioned
        # the version alone is not what the preload made: its alias must name it too
        d.cli("load", "llm", str(ckpt), "--version", "v1", check=True)
        d.cli("load", "other", str(unversioned), check=True)
        (left,) = d.wait_status(lambda s: len(s.get("start_failures", ())) == 1)["start_failures"]
        assert left.startswith("preload llm@v1 from "), left
        d.cli("alias", "prod", "llm@v1", "--create", check=True)
        st = d.wait_status(lambda s: not s.get("start_failures"))
        assert st["aliases"] == [{"alias": "prod", "name": "llm", "version": "v1"}]
        assert "failed at start" not in d.cli("status", check=True).stdout
    finally:
        assert d.stop() == 0


def test_follow_reattaches_on_alias_move_and_releases_the_old_mapping(daemon, client, tmp_path):
    import threading

    daemon.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
    seen: list[tuple[str, int]] = []
    changed = threading.Event()

    def on_change(att):
        seen.append((att.version, int(att["marker"][0])))
        changed.set()

    follower = client.follow("prod", on_change, holder="follower")
    try:
        assert seen == [("v1", 1)]
        changed.clear()
        daemon.cli("swap", "prod", str(versioned(tmp_path, 2)), "--version", "v2", "--no-keep-previous", check=True)
        assert changed.wait(testing.WAIT_TIMEOUT), "the follower was not told of the move"
        assert seen[-1] == ("v2", 2) and follower.current.version == "v2"
        # the old mapping was released after the new one was handed over, so v1 is freed
        st = daemon.wait_status(lambda s: len(s["versions"]) == 1)
        assert [v["version"] for v in st["versions"]] == ["v2"]
        assert [le["version"] for le in daemon.status()["leases"]] == ["v2"]
    finally:
        follower.close()
    assert daemon.status()["leases"] == []


def test_a_follower_whose_engine_refuses_a_version_keeps_the_old_one_and_follows_the_next(daemon, client, tmp_path):
    import threading

    daemon.cli("load", "llm", str(versioned(tmp_path, 1)), "--version", "v1", "--alias", "prod", check=True)
    offered: list[str] = []
    offer = threading.Event()

    def on_change(att):
        offered.append(att.version)
        offer.set()
        if att.version == "v2":
            raise RuntimeError("the engine could not take the new weights")

    follower = client.follow("prod", on_change, holder="follower")
    try:
        offer.clear()
        daemon.cli("swap", "prod", str(versioned(tmp_path, 2)), "--version", "v2", check=True)
        assert offer.wait(testing.WAIT_TIMEOUT), "the follower was not told of the move"
        # v2 is let go, v1 (what the engine still serves) stays leased
        st = daemon.wait_status(lambda s: [le["version"] for le in s["leases"]] == ["v1"])
        assert follower.current.version == "v1" and not follower.current.released, st
        offer.clear()
        daemon.cli("swap", "prod", str(versioned(tmp_path, 3)), "--version", "v3", check=True)
        assert offer.wait(testing.WAIT_TIMEOUT), "the follower stopped following after the refusal"
        daemon.wait_status(lambda s: [le["version"] for le in s["leases"]] == ["v3"])
        assert offered == ["v1", "v2", "v3"] and follower.current.version == "v3"
    finally:
        follower.close()
    assert daemon.status()["leases"] == []
