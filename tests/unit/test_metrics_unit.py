"""The metrics' pieces without a daemon: where the socket is, the path kinds, the config keys,
counters from events, and the textfile's atomic rewrite."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotweights.paths import metrics_socket_for
from hotweightsd.config import load_config
from hotweightsd.core.events import Event, EventKind
from hotweightsd.server.metrics import DaemonMetrics, path_kind, write_textfile


def test_the_metrics_socket_is_derived_from_the_daemons_socket():
    assert metrics_socket_for("/run/hotweights/hotweights.sock") == "/run/hotweights/hotweights.sock.metrics"
    assert metrics_socket_for("/a.sock", "auto") == "/a.sock.metrics"
    assert metrics_socket_for("/a.sock", " AUTO ") == "/a.sock.metrics"
    assert metrics_socket_for("/a.sock", "/b/m.sock") == "/b/m.sock"
    for off in ("off", "OFF", "none", "", "  "):
        assert metrics_socket_for("/a.sock", off) is None


def test_metrics_keys_from_file_env_and_flags(tmp_path):
    cfg = load_config("none", env={})
    assert (cfg.metrics_socket, cfg.metrics_textfile, cfg.metrics_interval) == ("auto", "", 15.0)
    f = tmp_path / "c.toml"
    f.write_text('metrics_socket = "off"\nmetrics_textfile = "/var/lib/ne/hw.prom"\nmetrics_interval = 5\n')
    cfg = load_config(str(f), env={})
    assert (cfg.metrics_socket, cfg.metrics_textfile, cfg.metrics_interval) == ("off", "/var/lib/ne/hw.prom", 5.0)
    cfg = load_config(str(f), {"metrics_interval": "2.5"}, env={"HOTWEIGHTS_METRICS_SOCKET": "/x/m.sock"})
    assert (cfg.metrics_socket, cfg.metrics_interval) == ("/x/m.sock", 2.5)
    with pytest.raises(Exception, match="metrics_interval"):
        load_config("none", {"metrics_interval": "0"}, env={})


@pytest.mark.parametrize(
    "desc, kind",
    [
        ("cpu: pread into memfd, 4 threads", "cpu"),
        ("bounce: pread ring 8 threads x 2 x 4MiB on cuda:0; 10 reads, 10 copies (GDS off by configuration)", "bounce"),
        ("bounce: pread ring 8 threads x 2 x 4MiB; 1 reads (GDS unavailable: libcufile cannot be loaded)", "bounce"),
        ("bounce: odirect ring 8 threads x 2 x 4MiB on cuda:1; 4 reads, 4 copies (GDS unavailable)", "odirect"),
        ("gds: cuFile, 8 threads x 16MiB reads on cuda:0; 3 reads (GDS: /dev/nvidia-fs0)", "gds"),
        ("", "unknown"),
    ],
)
def test_path_kind_reads_the_head_of_a_fill_description(desc, kind):
    assert path_kind(desc) == kind


def parse(text: bytes) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_counters_follow_events_and_gauges_the_snapshot():
    snap = {
        "devices": [{"index": 0, "free": 10, "total": 100}],
        "versions": [
            {
                "name": "m",
                "version": "v1",
                "state": "READY",
                "leases": 2,
                "resident_by_device": {0: 4096},
                "ranks": [{"rank": 0, "bytes": 4000, "seconds": 0.5, "path": "bounce"}],
            }
        ],
    }
    m = DaemonMetrics(lambda: snap)
    m.on_event(Event(EventKind.VERSION_READY, "m", "v1"))
    m.on_event(Event(EventKind.VERSION_FAILED, "m", "v2", message="boom", reason="BackendError"))
    m.on_event(Event(EventKind.ALIAS_MOVED, "m", "v1", alias="prod"))
    m.refused(KeyError("x"))
    m.attach_seconds.observe(0.003)
    found = parse(m.exposition())
    assert found[("hotweights_loads_total", (("result", "ready"),))] == 1
    assert found[("hotweights_loads_total", (("result", "failed"),))] == 1
    assert found[("hotweights_load_failures_total", (("reason", "BackendError"),))] == 1
    assert found[("hotweights_load_failures_total", (("reason", "KeyError"),))] == 1
    assert found[("hotweights_attach_seconds_count", ())] == 1
    assert found[("hotweights_attach_seconds_bucket", (("le", "0.005"),))] == 1
    assert found[("hotweights_device_free_bytes", (("device", "0"),))] == 10
    assert found[("hotweights_resident_bytes", (("device", "0"), ("model", "m"), ("version", "v1")))] == 4096
    assert found[("hotweights_leases_open", (("model", "m"), ("version", "v1")))] == 2
    rank = (("model", "m"), ("path", "bounce"), ("rank", "0"), ("version", "v1"))
    assert found[("hotweights_load_bytes", rank)] == 4000
    assert found[("hotweights_load_seconds", rank)] == 0.5
    # two daemons in one process keep their own counts
    assert parse(DaemonMetrics(lambda: {}).exposition())[("hotweights_loads_total", (("result", "ready"),))] == 0


def test_the_textfile_is_replaced_whole(tmp_path):
    target = tmp_path / "hw.prom"
    target.write_text("old\n")
    write_textfile(target, b"new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["hw.prom"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_stopping_the_server_closes_the_refused_connections_and_ends_their_reader(tmp_path):
    import socket
    import threading

    from hotweights.testing import wait_until
    from hotweightsd.server.metrics import MetricsServer

    path = str(tmp_path / "m.sock")
    server = MetricsServer(path, DaemonMetrics(lambda: {"devices": [], "versions": []}), timeout=600, max_connections=1)
    server.start()
    clients = []
    try:
        for _ in range(4):  # one served (it holds the one slot, silent), three answered busy and kept to be read
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(30)
            c.connect(path)
            clients.append(c)
        for c in clients[1:]:
            assert c.recv(4096).startswith(b"HTTP/1.0 503")
        wait_until(lambda: any(t.name == "hw-metrics-busy" for t in threading.enumerate()), 30, "the busy reader")
        server.stop()  # well before their 600 s: stop closes them
        for c in clients[1:]:
            assert c.recv(4096) == b""
        assert not any(t.name == "hw-metrics-busy" for t in threading.enumerate())
    finally:
        for c in clients:
            c.close()
