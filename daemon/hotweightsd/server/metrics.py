"""The daemon's Prometheus metrics: counters bumped where events happen, gauges read from the core at scrape.

Gauges are computed when scraped (a collector over the manager's state), so no code path has to
keep them in step; counters and the attach histogram are bumped where the event happens. Names
follow Prometheus conventions: ``hotweights_*_bytes``, ``*_seconds``, ``*_total``.

The systemd unit runs the daemon with PrivateNetwork=yes, so there is no TCP port: the text is
served over HTTP on a unix socket beside the daemon's (``MetricsServer``) and, where configured,
rewritten into a file for node-exporter's textfile collector (``TextfileWriter``).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from hotweights.errors import DaemonAlreadyRunning
from hotweightsd.core.events import Event, EventKind
from hotweightsd.core.manager import ModelManager
from hotweightsd.server.sockets import alive, born_with_mode
from hotweightsd.threadnames import os_thread_name

log = structlog.get_logger("hotweightsd.metrics")

# Attach is milliseconds when warm; the buckets reach seconds for a loaded node's first attach.
ATTACH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def path_kind(load_path: str) -> str:
    """bounce | odirect | gds | cpu, from a rank's fill description (``unknown`` when there is none).

    Only the head of the description is read: its tail explains the choice and may name cuFile or
    O_DIRECT for a load that used neither ("bounce: pread ring ... (GDS unavailable: libcufile ...)").
    """
    text = load_path.strip().lower()
    if text.startswith("gds"):
        return "gds"
    if text.startswith("bounce"):
        return "odirect" if text.removeprefix("bounce:").strip().startswith("odirect") else "bounce"
    if text.startswith("cpu"):
        return "cpu"
    return "unknown"


def snapshot(manager: ModelManager) -> dict[str, Any]:
    """What the gauges show, read from the manager now."""
    devices = [{"index": d.index, "free": d.free, "total": d.total} for d in manager.backend.devices()]
    # Each allocation counted once, at the oldest version holding it: a version loaded from the same
    # files as another shares its memory, and summing the gauge over versions must not count it twice.
    counted: dict[str, dict[int, int]] = {}
    for holder, r, a in manager.unique_allocations():
        per_device = counted.setdefault(holder.key, {})
        per_device[r.device] = per_device.get(r.device, 0) + a.size
    versions = []
    for v in manager.versions():
        resident = {r.device: 0 for r in list(v.ranks)}
        resident.update(counted.get(v.key, {}))
        ranks = []
        for r in list(v.ranks):
            if r.load_seconds:
                ranks.append(
                    {
                        "rank": r.rank,
                        "bytes": r.layout.nbytes,
                        "seconds": r.load_seconds,
                        "path": path_kind(r.load_path),
                    }
                )
        versions.append(
            {
                "name": v.name,
                "version": v.version,
                "state": v.state.value,
                "leases": len(v.leases),
                "resident_by_device": resident,
                "ranks": ranks,
            }
        )
    return {"devices": devices, "versions": versions}


class _StateCollector(Collector):
    """Gauges from a snapshot of the daemon's state, taken at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._snapshot()
        free = GaugeMetricFamily(
            "hotweights_device_free_bytes", "Device memory free (host memory for the cpu backend)", labels=["device"]
        )
        total = GaugeMetricFamily("hotweights_device_total_bytes", "Device memory", labels=["device"])
        for d in s.get("devices", []):
            free.add_metric([str(d["index"])], d["free"])
            total.add_metric([str(d["index"])], d["total"])
        resident = GaugeMetricFamily(
            "hotweights_resident_bytes",
            "Bytes held per device and model version (memory shared by versions of the same files: at the oldest)",
            labels=["device", "model", "version"],
        )
        leases = GaugeMetricFamily(
            "hotweights_leases_open", "Open leases per model version", labels=["model", "version"]
        )
        state = GaugeMetricFamily(
            "hotweights_version_state", "1 for the state a model version is in", labels=["model", "version", "state"]
        )
        labels = ["model", "version", "rank", "path"]
        load_bytes = GaugeMetricFamily("hotweights_load_bytes", "Bytes read by a rank's load", labels=labels)
        load_seconds = GaugeMetricFamily("hotweights_load_seconds", "Duration of a rank's load", labels=labels)
        for v in s.get("versions", []):
            key = [v["name"], v["version"]]
            for device, n in sorted(v["resident_by_device"].items()):
                resident.add_metric([str(device), *key], n)
            leases.add_metric(key, v["leases"])
            state.add_metric([*key, v["state"]], 1)
            for r in v["ranks"]:
                rank = [*key, str(r["rank"]), r["path"]]
                load_bytes.add_metric(rank, r["bytes"])
                load_seconds.add_metric(rank, r["seconds"])
        yield from (free, total, resident, leases, state, load_bytes, load_seconds)


class DaemonMetrics:
    """One registry per daemon (tests run several in one process)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.loads = Counter(
            "hotweights_loads", "Loads finished, by result (ready, failed)", ["result"], registry=self.registry
        )
        self.load_failures = Counter(
            "hotweights_load_failures",
            "Loads refused or failed, by reason (the error class)",
            ["reason"],
            registry=self.registry,
        )
        self.swaps = Counter("hotweights_swaps", "Alias swaps finished, by mode", ["mode"], registry=self.registry)
        self.attaches = Counter(
            "hotweights_attaches", "Lease opens, by result (ok, error)", ["result"], registry=self.registry
        )
        self.attach_seconds = Histogram(
            "hotweights_attach_seconds",
            "Daemon-side time of a lease open (with its handle table when asked for)",
            buckets=ATTACH_BUCKETS,
            registry=self.registry,
        )
        self.fd_channel = Counter(
            "hotweights_fd_channel_connections",
            "fd side channel connections by outcome (ok, refused, io_error)",
            ["outcome"],
            registry=self.registry,
        )
        # The result labels exist from the start, so that rate() sees the first increment.
        for result in ("ready", "failed"):
            self.loads.labels(result)
        for result in ("ok", "error"):
            self.attaches.labels(result)
        self.registry.register(_StateCollector(snapshot))
        self.unsubscribe: Callable[[], None] = lambda: None

    @classmethod
    def for_manager(cls, manager: ModelManager) -> DaemonMetrics:
        """Metrics over ``manager``: gauges from its state, loads counted from its events."""
        metrics = cls(lambda: snapshot(manager))
        metrics.unsubscribe = manager.events.subscribe(metrics.on_event)
        return metrics

    def on_event(self, ev: Event) -> None:
        # an event subscriber: runs on the publishing thread and only bumps counters
        if ev.kind is EventKind.VERSION_READY:
            self.loads.labels("ready").inc()
        elif ev.kind is EventKind.VERSION_FAILED:
            self.loads.labels("failed").inc()
            self.load_failures.labels(ev.reason or "unknown").inc()

    def refused(self, exc: BaseException) -> None:
        """A load refused before it started reading (admission, a bad checkpoint): no event is published."""
        self.load_failures.labels(type(exc).__name__).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric now."""
        return generate_latest(self.registry)


# Every reader may connect to the metrics socket, and each connection has a thread: a connection
# that sends nothing is cut after the timeout, and past the cap new ones are answered busy at once.
METRICS_TIMEOUT_SECONDS = 5.0
METRICS_MAX_CONNECTIONS = 32
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n"
# A connection answered busy is kept open until its request is read (within the connection timeout):
# closed with the request unsent or unread, it reaches the client as a broken pipe or a reset, not as the
# 503. One thread reads them, a bounded number waiting; past that they are closed at once.
_REFUSED_QUEUE = 64


class _ReadBy(io.RawIOBase):
    """A socket's reads, each given only the time left until ``deadline`` (time.monotonic)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the metrics request took longer than its deadline")
        self._sock.settimeout(left)
        return self._sock.recv_into(buf)


class _Handler(BaseHTTPRequestHandler):
    server: _UnixHTTPServer

    def setup(self) -> None:
        self.request.settimeout(self.server.handler_timeout)
        super().setup()
        # The socket timeout bounds each read: a client sending a byte now and then would keep its thread
        # and its slot for ever. Reads of the request share one deadline instead.
        self.rfile = io.BufferedReader(_ReadBy(self.connection, time.monotonic() + self.server.handler_timeout))

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_error(404, "only /metrics is served")
            return
        try:
            body = self.server.metrics.exposition()
        except Exception as exc:
            log.exception("metrics.scrape_failed")
            self.send_error(500, f"{type(exc).__name__}: {exc}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"  # a unix socket's peer has no address; the default indexes into one

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the daemon's log


CONNECTION_THREAD = "hw-metrics-conn"


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, metrics: DaemonMetrics, timeout: float, max_connections: int) -> None:
        self.metrics = metrics
        self.handler_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refused: queue.Queue = queue.Queue(_REFUSED_QUEUE)
        self._refuser: threading.Thread | None = None
        self._reading: socket.socket | None = None  # the refused connection being read now
        super().__init__(path, _Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        with born_with_mode(0o660):
            self.socket.bind(self.server_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(_BUSY)
                request.shutdown(socket.SHUT_WR)
                self._refused.put_nowait(request)
            except (OSError, queue.Full):
                self.shutdown_request(request)
                return
            if self._refuser is None:
                self._refuser = threading.Thread(target=self._read_refused, name="hw-metrics-busy", daemon=True)
                self._refuser.start()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _read_refused(self) -> None:
        """Reads what each connection answered busy sends, until it closes or its headers are in (within the
        connection timeout), then closes it."""
        while True:
            request = self._refused.get()
            if request is None:
                return
            self._reading = request
            deadline, seen = time.monotonic() + self.handler_timeout, b""
            try:
                while (left := deadline - time.monotonic()) > 0:
                    request.settimeout(left)
                    chunk = request.recv(65536)
                    seen = (seen + chunk)[-4:]
                    if not chunk or seen == b"\r\n\r\n":  # closed, or its headers are all in (no body)
                        break
            except OSError:
                pass
            finally:
                self._reading = None
                request.close()

    def server_close(self) -> None:
        """Closes the listening socket and every refused connection still open, and ends their reader."""
        super().server_close()
        if self._refuser is None:
            return
        while True:  # nothing is added any more: the server has stopped accepting
            try:
                waiting = self._refused.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting.close()
        reading = self._reading
        if reading is not None:
            try:
                reading.shutdown(socket.SHUT_RDWR)  # wakes its read at once
            except OSError:
                pass
        self._refused.put_nowait(None)
        self._refuser.join(self.handler_timeout + 1)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # socketserver names its threads Thread-N: named, a connection's thread can be told from the rest
        threading.current_thread().name = CONNECTION_THREAD
        os_thread_name(CONNECTION_THREAD)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """HTTP on a unix socket: ``GET /metrics`` answers the Prometheus text format."""

    def __init__(
        self,
        path: str,
        metrics: DaemonMetrics,
        timeout: float = METRICS_TIMEOUT_SECONDS,
        max_connections: int = METRICS_MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        if os.path.exists(path):
            if alive(path):
                raise DaemonAlreadyRunning(f"a live process answers on {path}; refusing to take it over", socket=path)
            os.unlink(path)
        self._server = _UnixHTTPServer(path, metrics, timeout, max_connections)
        try:
            self._server.server_bind()
            self._server.server_activate()
        except BaseException:
            self._server.server_close()
            raise
        self._thread = threading.Thread(target=self._server.serve_forever, name="hw-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def write_textfile(path: str | os.PathLike, text: bytes) -> None:
    """Replaces ``path`` with ``text`` in one rename: a reader sees the old file or the new one, never half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class TextfileWriter:
    """Rewrites a file with the exposition every ``interval`` seconds (node-exporter's textfile collector)."""

    def __init__(self, path: str, metrics: DaemonMetrics, interval: float) -> None:
        self.path = path
        self.metrics = metrics
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hw-metrics-file", daemon=True)
        self._failing = False

    def start(self) -> None:
        self.write()
        self._thread.start()

    def write(self) -> None:
        try:
            write_textfile(self.path, self.metrics.exposition())
            if self._failing:
                log.info("metrics.textfile_written", path=self.path)
            self._failing = False
        except Exception as exc:  # the writer must outlive a failed write: the next one may work
            if not self._failing:  # once per outage, not every interval
                log.warning("metrics.textfile_failed", path=self.path, error=f"{type(exc).__name__}: {exc}")
            self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.write()  # the final counts


__all__ = [
    "ATTACH_BUCKETS",
    "DaemonMetrics",
    "MetricsServer",
    "TextfileWriter",
    "path_kind",
    "snapshot",
    "write_textfile",
]
