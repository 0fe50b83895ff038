"""The daemon's Prometheus metrics, read as an operator reads them: `hotweights metrics` on the
metrics unix socket after a real load and an attach from another process, and the textfile for
node-exporter. The text is parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.ckpt_tools import write_model
from support.daemons import run_cli, run_client, short_tmpdir, start_daemon, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def named(found: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


def tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors: the file less its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


def metrics_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("metrics", *args)


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_metrics_after_a_load_and_an_attach_from_another_process(sockdir, tmp_path):
    ckpt = write_model(tmp_path / "mixed.safetensors")
    d = start_daemon(str(sockdir / "hw.sock"))
    try:
        assert os.path.exists(d.socket + ".metrics")
        t0 = time.monotonic()
        r = run_client("attach_and_compare", d.socket, str(ckpt))  # loads "mixed", attaches, compares
        client_wall = time.monotonic() - t0  # the daemon's load and attach both ran within it
        assert r.stdout.startswith("OK"), r.stdout + r.stderr
        refused = d.cli("load", "other", str(tmp_path / "missing.safetensors"))
        assert refused.returncode == 1

        def scraped() -> dict | None:
            out = d.cli("metrics")
            assert out.returncode == 0, out.stderr + out.stdout
            found = samples(out.stdout)
            # the client's lease ends when its process has gone: wait for the daemon to see it
            return (
                found
                if named(found, "hotweights_leases_open") and 0 == sum(named(found, "hotweights_leases_open").values())
                else None
            )

        found = wait_until(scraped, what="a scrape showing the client's lease closed")
        listed = json.loads(d.cli("list", "--json", check=True).stdout)["versions"]
        (v,) = listed
        version = v["version"]

        assert value(found, "hotweights_loads_total", result="ready") == 1
        assert value(found, "hotweights_loads_total", result="failed") == 0
        assert sum(named(found, "hotweights_load_failures_total").values()) == 1

        # resident: the allocations holding the checkpoint's tensor bytes, rounded up to whole pages
        st = d.status()
        resident = named(found, "hotweights_resident_bytes")
        assert resident == {(("device", "0"), ("model", "mixed"), ("version", version)): st["resident_bytes"]}
        assert v["bytes"] == tensor_bytes(ckpt) <= st["resident_bytes"] < tensor_bytes(ckpt) + 2**20
        assert value(found, "hotweights_leases_open", model="mixed", version=version) == 0
        assert value(found, "hotweights_version_state", model="mixed", version=version, state="READY") == 1

        labels = {"model": "mixed", "version": version, "rank": "0", "path": "cpu"}
        assert value(found, "hotweights_load_bytes", **labels) == tensor_bytes(ckpt)
        assert 0 < value(found, "hotweights_load_seconds", **labels) <= client_wall

        assert value(found, "hotweights_attaches_total", result="ok") >= 1
        assert value(found, "hotweights_attach_seconds_count") >= 1
        assert 0 < value(found, "hotweights_attach_seconds_sum") <= client_wall
        assert value(found, "hotweights_attach_seconds_bucket", le="+Inf") >= 1
        assert value(found, "hotweights_fd_channel_connections_total", outcome="ok") >= 1

        # the cpu backend's device is host memory, whose figures move between two reads
        assert (
            0
            < value(found, "hotweights_device_free_bytes", device="0")
            <= value(found, "hotweights_device_total_bytes", device="0")
        )
        assert set(named(found, "hotweights_device_total_bytes")) == {(("device", "0"),)}
    finally:
        code = d.stop()
    assert code == 0, d.logs()
    assert not os.path.exists(d.socket + ".metrics"), "the metrics socket outlived the daemon"


def test_a_swap_to_a_version_that_is_not_loaded_is_no_load_failure(sockdir, tmp_path):
    """A swap to NAME@VERSION reads nothing: its typos (alias or version) must not move the counter an
    operator alerts on; a swap to a path that cannot be read is a load refused, and does."""
    ckpt = write_model(tmp_path / "m.safetensors")
    d = start_daemon(str(sockdir / "hw.sock"))
    try:
        d.cli("load", "m", str(ckpt), "--version", "v1", "--alias", "prod", check=True)
        assert d.cli("swap", "prdo", "m@v1").returncode == 1
        assert d.cli("swap", "prod", "m@v9").returncode == 1
        assert sum(named(samples(d.cli("metrics").stdout), "hotweights_load_failures_total").values()) == 0
        assert d.cli("swap", "prod", str(tmp_path / "missing.safetensors")).returncode == 1
        found = samples(d.cli("metrics").stdout)
        assert value(found, "hotweights_load_failures_total", reason="NotFound") == 1
    finally:
        code = d.stop()
    assert code == 0, d.logs()


def test_textfile_is_rewritten_and_the_cli_says_when_metrics_are_off(sockdir, tmp_path):
    textfile = tmp_path / "hotweights.prom"
    ckpt, ckpt2 = write_model(tmp_path / "m.safetensors"), write_model(tmp_path / "m2.safetensors", seed=1)
    d = start_daemon(
        str(sockdir / "hw.sock"),
        "--metrics-socket",
        "off",
        "--metrics-textfile",
        str(textfile),
        "--metrics-interval",
        "0.2",
    )
    try:
        assert not os.path.exists(d.socket + ".metrics")
        off = d.cli("metrics")
        assert off.returncode == 1 and "serves no metrics" in off.stderr, off.stderr

        # written at start, before anything was loaded
        first = samples(textfile.read_text())
        assert value(first, "hotweights_loads_total", result="ready") == 0

        d.cli("load", "m", str(ckpt), "--version", "v1", "--alias", "prod", check=True)
        d.cli("swap", "prod", str(ckpt2), "--version", "v2", "--no-keep-previous", check=True)

        def swapped() -> dict | None:
            s = samples(textfile.read_text())
            # v1 had no lease: the swap frees it, and it leaves the gauges
            versions = {dict(k)["version"] for k in named(s, "hotweights_resident_bytes")}
            return s if value(s, "hotweights_swaps_total", mode="side-by-side") == 1 and versions == {"v2"} else None

        found = wait_until(
            swapped,
            what="the textfile to count the swap and drop v1",
            context=lambda: f"{textfile.read_text()}\n{d.logs()[-4000:]}",
        )
        assert value(found, "hotweights_loads_total", result="ready") == 2
        labels = {"model": "m", "version": "v2", "rank": "0", "path": "cpu"}
        assert value(found, "hotweights_load_bytes", **labels) == tensor_bytes(ckpt2)
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"
    finally:
        code = d.stop()
    assert code == 0, d.logs()
    # rewritten at stop with the final counts
    assert value(samples(textfile.read_text()), "hotweights_loads_total", result="ready") == 2


def test_metrics_without_a_daemon_is_a_clear_error(sockdir):
    r = metrics_cli("--socket", str(sockdir / "none.sock"))
    assert r.returncode == 1
    assert "no daemon answers" in r.stderr and str(sockdir / "none.sock.metrics") in r.stderr, r.stderr
    assert r.stdout == ""
