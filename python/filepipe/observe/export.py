"""The observers' figures for Prometheus, and the small HTTP server of the consumer:
`/metrics`, `/healthz`, `/readyz` (readiness is `health.ServiceProbe`'s, as on the
dashboard).

The figures that need a round trip (pending, lag, what the stream keeps) are read when
Prometheus scrapes, at most every few seconds, by a collector with its own connections;
what the consumer counts itself is in `filepipe.metrics`.

    serve_metrics(9108, consumer=consumer)   # /metrics, /healthz, /readyz
"""

from __future__ import annotations

import ipaddress
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..config import Settings
from ..errors import ConfigError
from .health import ServiceProbe, readiness
from .retained import RetentionState, read_retention
from .sample import sample_group

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from psycopg_pool import ConnectionPool


class Consumer(Protocol):
    """What the metrics server reads of a running consumer (filepipe.consumer.Consumer);
    a protocol, so that the observers do not import the consumer."""

    settings: Settings
    pool: ConnectionPool

    def table_refusal(self) -> str: ...


# -- figures read at scrape time ------------------------------------------------------


def pool_families(
    pool: ConnectionPool | None, labels: dict[str, str] | None = None
) -> list[GaugeMetricFamily]:
    """The psycopg pool's usage: connections in use and idle, its maximum, waiting requests.
    Without a pool, the families alone (for `describe`)."""
    labels = labels or {}
    names = list(labels)
    values = list(labels.values())
    conns = GaugeMetricFamily(
        "filepipe_db_pool_connections", "PostgreSQL pool connections, by state.", labels=[*names, "state"]
    )
    limit = GaugeMetricFamily("filepipe_db_pool_max_connections", "PostgreSQL pool size limit.", labels=names)
    waiting = GaugeMetricFamily(
        "filepipe_db_pool_waiting_requests", "Requests waiting for a pool connection.", labels=names
    )
    if pool is None:
        return [conns, limit, waiting]
    stats = pool.get_stats()
    size = int(stats.get("pool_size", 0))
    idle = int(stats.get("pool_available", 0))
    conns.add_metric([*values, "in_use"], max(size - idle, 0))
    conns.add_metric([*values, "idle"], idle)
    limit.add_metric(values, int(stats.get("pool_max", pool.max_size)))
    waiting.add_metric(values, int(stats.get("requests_waiting", 0)))
    return [conns, limit, waiting]


def group_families(stream: str, group: str, pending: int | None, lag: int | None) -> list[GaugeMetricFamily]:
    """The consumer group's pending entries (delivered, not acked) and lag (not yet delivered)."""
    out = []
    for name, doc, value in (
        ("filepipe_pending_entries", "Entries delivered to the group and not yet acknowledged.", pending),
        ("filepipe_lag_entries", "Entries in the stream not yet delivered to the group.", lag),
    ):
        family = GaugeMetricFamily(name, doc, labels=["stream", "group"])
        if value is not None:
            family.add_metric([stream, group], value)
        out.append(family)
    return out


def retention_families(stream: str, kept: RetentionState | None) -> list[GaugeMetricFamily]:
    """What the stream keeps (entries by reason and group, bytes), its dead letters' cap,
    and Redis's memory against maxmemory (on a cluster, the fullest master). Without a
    reading, the families alone."""
    entries = GaugeMetricFamily(
        "filepipe_stream_kept_entries",
        "Entries the stream keeps, by why they are kept (pending, unread, retention, no_group) and the group "
        "that holds them.",
        labels=["stream", "reason", "group"],
    )
    memory = GaugeMetricFamily(
        "filepipe_stream_memory_bytes", "Memory of the stream in Redis (MEMORY USAGE).", labels=["stream"]
    )
    cap = GaugeMetricFamily(
        "filepipe_dead_letter_cap_entries",
        "DEAD_LETTER_RETENTION's cap on each dead-letter stream (0: no count limit).",
        labels=["stream"],
    )
    used = GaugeMetricFamily("filepipe_redis_memory_used_bytes", "Redis used_memory.", labels=["node"])
    limit = GaugeMetricFamily(
        "filepipe_redis_memory_max_bytes", "Redis maxmemory (0: no limit).", labels=["node"]
    )
    out = [entries, memory, cap, used, limit]
    if kept is None:
        return out
    by: dict[tuple[str, str], int] = {}
    for k in kept.streams:
        if k.length:
            key = (k.why, k.holder if k.why in ("pending", "unread") else "")
            by[key] = by.get(key, 0) + k.length
    for (why, group), n in sorted(by.items()):
        entries.add_metric([stream, why, group], n)
    memory.add_metric([stream], kept.memory_bytes)
    cap.add_metric([stream], kept.dead_cap)
    if kept.memory is not None:
        used.add_metric([kept.memory.node], kept.memory.used_bytes)
        limit.add_metric([kept.memory.node], kept.memory.max_bytes)
    return out


class ConsumerCollector(Collector):
    """Pending, lag and pool usage of one consumer, read when scraped. Redis is asked
    at most every `refresh` seconds (on the probe's connection, not the consumer's), the
    way the dashboard asks (`sample.sample_group`)."""

    def __init__(self, consumer: Consumer, probe: ServiceProbe, refresh: float = 5.0) -> None:
        self.consumer = consumer
        self.probe = probe
        self.refresh = refresh
        self._lock = threading.Lock()
        self._at = 0.0
        self._pending: int | None = None
        self._lag: int | None = None
        self._kept: RetentionState | None = None

    def _group_figures(self) -> tuple[int | None, int | None, RetentionState | None]:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh:
                s = self.consumer.settings
                r = self.probe.redis()
                try:
                    # The dashboard's reading: a partitioned stream's sums, under its own name.
                    group = sample_group(r, s)
                    self._pending, self._lag = group.pending, group.lag
                    self._kept = read_retention(r, s)
                    self._at = time.monotonic()
                except Exception:
                    self._pending = self._lag = self._kept = None  # unknown is better than stale
            return self._pending, self._lag, self._kept

    def describe(self) -> Iterator[Any]:
        # Lets the registry check names without asking Redis at registration time.
        s = self.consumer.settings
        yield InfoMetricFamily("filepipe_consumer", "This consumer.")
        yield from group_families(s.stream, s.group, None, None)
        yield from pool_families(None)
        yield _refusing_family(None)
        yield GaugeMetricFamily("filepipe_stream_entries", "Entries in the stream (XLEN).", labels=["stream"])
        yield from retention_families(s.stream, None)

    def collect(self) -> Iterator[Any]:
        s = self.consumer.settings
        info = InfoMetricFamily("filepipe_consumer", "This consumer.")
        info.add_metric(
            [], {"name": s.consumer_name, "stream": s.stream, "group": s.group, "version": __version__}
        )
        yield info
        pending, lag, kept = self._group_figures()
        yield from group_families(s.stream, s.group, pending, lag)
        yield from pool_families(self.consumer.pool)
        yield _refusing_family(bool(self.consumer.table_refusal()))
        length = GaugeMetricFamily(
            "filepipe_stream_entries", "Entries in the stream (XLEN).", labels=["stream"]
        )
        if kept is not None:
            length.add_metric([s.stream], kept.length)
        yield length
        yield from retention_families(s.stream, kept)


def _refusing_family(refusing: bool | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "filepipe_table_refusing_rows",
        "1 while the events table refuses every row of the batches in hand (they wait, pending), else 0.",
    )
    if refusing is not None:
        family.add_metric([], int(refusing))
    return family


# -- which Host names are answered (DNS rebinding) ------------------------------------

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_host_names(names: Iterable[str]) -> list[str]:
    """The names given with --allowed-host, lower-cased; `*.example.com` allows its
    subdomains. A bare `*` would switch the check off: ConfigError."""
    out = []
    for name in names:
        name = name.strip().lower()
        if name in ("*", "") or (name.startswith("*") and not name.startswith("*.")):
            raise ConfigError(
                f"--allowed-host {name!r} would accept any Host header: name the host(s) "
                "the page is reached by (example.com, *.example.com)"
            )
        out.append(name.strip("[]"))
    return out


def host_allowed(header: str | None, names: Iterable[str]) -> bool:
    """Whether a request's Host header names this server: a loopback name, an IP address
    (a page can be made to reach one only by its address, which DNS rebinding cannot
    fake), or one of `names` (see `check_host_names`). A port is ignored."""
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    if not host:
        return False
    if host in LOOPBACK_HOSTS:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return any(name == host or (name.startswith("*.") and host.endswith(name[1:])) for name in names)


# -- the HTTP server -----------------------------------------------------------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def metrics_wsgi_app(
    registry: CollectorRegistry,
    probe: ServiceProbe | None,
    allowed_hosts: Iterable[str] = (),
    consumer: Consumer | None = None,
) -> Callable[..., Iterable[bytes]]:
    """`/metrics` (and any other path, like prometheus_client), `/healthz` (the process
    serves), `/readyz` (200 only when Redis and PostgreSQL answer and, with `consumer`,
    while its table accepts rows; 503 otherwise). A request whose Host header is not one
    of this server's names gets 400. A table refusing rows leaves `/healthz` alone:
    restarting the consumer would not help, it waits by itself."""
    metrics = make_wsgi_app(registry)
    names = check_host_names(allowed_hosts)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not host_allowed(environ.get("HTTP_HOST"), names):
            start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Invalid host header\n"]
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        if path == "/readyz":
            checks = probe.check() if probe is not None else {}
            if consumer is not None and not checks.get("table"):
                checks["table"] = consumer.table_refusal() or None
            ready, doc = readiness(checks)
            body = json.dumps(doc).encode()
            start_response(
                "200 OK" if ready else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
            )
            return [body]
        body_iter: Iterable[bytes] = metrics(environ, start_response)
        return body_iter

    return app


class MetricsServer:
    """A running metrics endpoint; `close()` stops it and unregisters its collector."""

    def __init__(
        self,
        server: WSGIServer,
        thread: threading.Thread,
        probe: ServiceProbe | None,
        registry: CollectorRegistry,
        collector: Collector | None,
    ) -> None:
        self.server = server
        self.thread = thread
        self.probe = probe
        self.registry = registry
        self.collector = collector

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        if self.collector is not None:
            self.registry.unregister(self.collector)
            self.collector = None
        if self.probe is not None:
            self.probe.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(
    port: int,
    host: str = "127.0.0.1",
    *,
    consumer: Consumer | None = None,
    settings: Settings | None = None,
    registry: CollectorRegistry = REGISTRY,
    allowed_hosts: Iterable[str] = (),
) -> MetricsServer:
    """Serves `/metrics`, `/healthz` and `/readyz` on `host:port` from a daemon thread
    (port 0 picks a free one). With `consumer`, its pending, lag and pool usage are
    exported too, and readiness checks its Redis and PostgreSQL. Requests must name the
    server by a loopback name, an IP address or one of `allowed_hosts`."""
    allowed_hosts = check_host_names(allowed_hosts)  # a bad name fails before anything starts
    settings = settings or (consumer.settings if consumer is not None else None)
    probe = ServiceProbe(settings) if settings is not None else None
    collector: Collector | None = None
    if consumer is not None and probe is not None:
        collector = ConsumerCollector(consumer, probe)
        registry.register(collector)
    try:
        server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
        server = make_server(
            host.strip("[]"),
            port,
            metrics_wsgi_app(registry, probe, allowed_hosts, consumer),
            server_class,
            handler_class=_QuietHandler,
        )
    except OSError as e:
        if collector is not None:
            registry.unregister(collector)
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
    thread = threading.Thread(target=server.serve_forever, name="filepipe-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread, probe, registry, collector)
