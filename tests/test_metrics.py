"""The consumer's Prometheus metrics, scraped over HTTP and read with the Prometheus
parser, against real Redis and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tests.conftest import Env
from tests.support.workload import wait_for

from filepipe.consumer import Consumer
from filepipe.embedded import RedisServer, free_port
from filepipe.errors import ConfigError
from filepipe.metrics import record_retry
from filepipe.observe.export import serve_metrics
from filepipe.retry import Backoff

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[dict[str, Any], Samples]:
    """Families by name, and every sample by (name, sorted labels)."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples: Samples = {}
    for f in families.values():
        for s in f.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def scrape_until(url: str, check: Any, what: str) -> Samples:
    """Scrapes until `check(samples)` holds (figures read from Redis are at most 5 s old)."""
    found: list[Samples] = []

    def ok() -> bool:
        samples = scrape(url)[1]
        found[:] = [samples]
        return bool(check(samples))

    wait_for(ok, 15, what)
    return found[0]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def running(consumer: Consumer) -> Iterator[Consumer]:
    thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive()


def add_good(env: Env, n: int, prefix: str = "m") -> None:
    for i in range(n):
        key = f"{prefix}/{i}.txt"
        env.write_file(key, f"{prefix} {i}".encode())
        env.xadd({"file_id": str(uuid.uuid4()), "filename": f"{i}.txt", "key": key})


def test_consumer_counts_batches_rejects_and_latencies(env: Env) -> None:
    s = env.settings
    consumer = Consumer(env.settings_with(batch_size=4), write=None)
    server = serve_metrics(0, consumer=consumer)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        _, before = scrape(url)
        add_good(env, 10)
        env.xadd({"filename": "no id", "key": "m/0.txt"})
        env.xadd({"file_id": str(uuid.uuid4()), "filename": "gone.txt", "key": "missing.txt"})
        with running(consumer):
            wait_for(
                lambda: env.rows() == 10 and env.pending() == 0 and len(env.dead()) == 2, what="the batch"
            )
        families, after = scrape(url)
    finally:
        server.close()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    reasons = Counter(f[b"reason"].decode() for _, f in env.dead())
    assert delta("filepipe_processed_total") == 10
    assert delta("filepipe_acked_total") == 12
    for reason, n in reasons.items():
        assert delta("filepipe_rejected_total", reason=reason) == n
    batches = delta("filepipe_batch_entries_count")
    assert batches >= 3  # 12 entries, 4 per batch
    assert delta("filepipe_batch_entries_sum") == 12
    assert delta("filepipe_batch_duration_seconds_count") == batches
    assert delta("filepipe_copy_duration_seconds_count") >= batches
    assert delta("filepipe_ack_duration_seconds_count") == batches
    assert delta("filepipe_ack_duration_seconds_sum") > 0
    assert value(after, "filepipe_batch_entries_bucket", le="+Inf") >= batches

    group = {"stream": s.stream, "group": s.group}
    assert ("filepipe_pending_entries", tuple(sorted(group.items()))) in after
    assert value(after, "filepipe_pending_entries", **group) == 0
    assert value(after, "filepipe_db_pool_max_connections") == s.pool_size
    assert ("filepipe_db_pool_connections", (("state", "in_use"),)) in after
    assert ("filepipe_db_pool_waiting_requests", ()) in after
    info = families["filepipe_consumer_info"].samples[0]
    assert info.labels["name"] == s.consumer_name and info.labels["stream"] == s.stream

    assert families["filepipe_processed"].type == "counter"
    assert families["filepipe_batch_duration_seconds"].type == "histogram"
    assert families["filepipe_pending_entries"].type == "gauge"


def test_pending_and_lag_are_read_at_scrape_time(env: Env) -> None:
    s = env.settings
    add_good(env, 5)
    consumer = Consumer(s, write=None)
    # Entries delivered to a consumer that died, and entries nobody read yet.
    env.redis.xgroup_create(s.stream, s.group, id="0")
    env.redis.xreadgroup(s.group, "dead-consumer", {s.stream: ">"}, count=2)
    with serve_metrics(0, consumer=consumer) as server:
        _, samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
        group = {"stream": s.stream, "group": s.group}
        assert value(samples, "filepipe_pending_entries", **group) == 2
        assert value(samples, "filepipe_lag_entries", **group) == 3
    consumer.pool.close()
    consumer.redis.close()


def test_retries_are_counted_by_service(env: Env) -> None:
    from prometheus_client import REGISTRY

    def retries(service: str) -> float:
        return REGISTRY.get_sample_value("filepipe_retries_total", {"service": service}) or 0.0

    before = retries("postgresql")
    backoff = Backoff("PostgreSQL", base=0.001, cap=0.001, on_retry=record_retry)  # as the consumer counts
    for _ in range(3):
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout=2)
        except psycopg.OperationalError as e:
            backoff.failed(e)
    assert retries("postgresql") - before == 3
    before_storage = retries("storage")
    Backoff("Storage", base=0.001, cap=0.001, on_retry=record_retry).failed(OSError("EMFILE"))
    assert retries("storage") - before_storage == 1


def test_health_and_readiness_follow_the_services(env: Env) -> None:
    with serve_metrics(0, settings=env.settings) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"redis": "ok", "postgresql": "ok", "table": "ok"}
    down = env.settings_with(
        pg_uri=f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout_s=1
    )
    with serve_metrics(0, settings=down) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"] == "ok" and ready.json()["checks"]["postgresql"] != "ok"
    missing = env.settings_with(table=f"{env.settings.table}_missing")
    with serve_metrics(0, settings=missing) as server:
        ready = httpx.get(f"http://127.0.0.1:{server.port}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        assert (
            ready.json()["checks"]["table"]
            == (f"table {missing.table} does not exist (run `filepipe init-db`)")
            and ready.json()["checks"]["postgresql"] == "ok"
        )


def test_not_ready_while_redis_is_full(env: Env) -> None:
    """A Redis at maxmemory under noeviction answers PING but refuses every new entry."""
    with RedisServer(extra_args=["--maxmemory-policy", "noeviction"]) as server:
        full = env.settings_with(redis_url=server.url)
        with serve_metrics(0, settings=full) as metrics_server:
            base = f"http://127.0.0.1:{metrics_server.port}"
            assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
            client = redis.Redis.from_url(server.url)
            try:
                client.config_set("maxmemory", "1")  # below what it uses already
                time.sleep(1.1)  # the probe's cache
                ready = httpx.get(f"{base}/readyz", timeout=10)
                assert ready.status_code == 503, ready.text
                assert ready.json()["checks"]["redis"].startswith("Redis is full ("), ready.text
                assert "noeviction): it refuses new entries" in ready.json()["checks"]["redis"]
                client.config_set("maxmemory", "0")
                time.sleep(1.1)
                assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
            finally:
                client.close()


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("read-only", "Redis is a read only replica (of 127.0.0.1:"),
        ("misconf", "Redis refuses writes (MISCONF): its last RDB snapshot failed"),
    ],
)
def test_not_ready_while_redis_refuses_writes(env: Env, fault: str, says: str) -> None:
    """A replica (as during a failover) and a Redis whose last snapshot failed answer PING
    and reads but refuse every write: not ready, with the reason status gives, until they
    take writes again."""
    from tests.test_faults_redis import FAULTS

    start, end, _ = FAULTS[fault]
    with RedisServer(extra_args=["--enable-protected-configs", "yes"]) as server:
        refusing = env.settings_with(redis_url=server.url)
        with serve_metrics(0, settings=refusing) as metrics_server:
            readyz = f"http://127.0.0.1:{metrics_server.port}/readyz"
            assert httpx.get(readyz, timeout=10).status_code == 200
            client = redis.Redis.from_url(server.url)
            try:
                start(client)
                ready = wait_for(
                    lambda: (r := httpx.get(readyz, timeout=10)).status_code == 503 and r,
                    what="/readyz to answer 503",
                )
                assert ready.json()["checks"]["redis"].startswith(says), ready.text
                end(client)
                wait_for(lambda: httpx.get(readyz, timeout=10).status_code == 200, what="ready again")
            finally:
                client.close()


def test_the_metrics_server_answers_only_its_own_names(env: Env) -> None:
    """A page served as evil.example that resolves to this host (DNS rebinding) gets
    nothing; Prometheus scraping by address, a loopback name or a given name does."""
    with serve_metrics(0, settings=env.settings, allowed_hosts=["consumer-7.internal"]) as server:
        base = f"http://127.0.0.1:{server.port}"
        for host in ("evil.example", "consumer-7.internal.evil.example", ""):
            for path in ("/metrics", "/readyz", "/healthz"):
                r = httpx.get(f"{base}{path}", headers={"host": host})
                assert r.status_code == 400 and "filepipe" not in r.text, (host, path)
        for host in ("127.0.0.1", f"localhost:{server.port}", "consumer-7.internal:9108", "10.0.0.5:9108"):
            assert httpx.get(f"{base}/metrics", headers={"host": host}).status_code == 200, host
    with pytest.raises(ConfigError, match="would accept any Host header"):
        serve_metrics(0, settings=env.settings, allowed_hosts=["*"])


def test_a_busy_port_is_a_clear_error(env: Env) -> None:
    with (
        serve_metrics(0, settings=env.settings) as server,
        pytest.raises(ConfigError, match="cannot serve metrics"),
    ):
        serve_metrics(server.port, settings=env.settings)


def test_names_follow_prometheus_conventions(env: Env) -> None:
    consumer = Consumer(env.settings, write=None)
    add_good(env, 1)
    with running(consumer), serve_metrics(0, consumer=consumer) as server:
        wait_for(lambda: env.rows() == 1, what="one row")
        families, _ = scrape(f"http://127.0.0.1:{server.port}/metrics")
    ours = {name: f for name, f in families.items() if name.startswith("filepipe")}
    assert len(ours) >= 14
    for name, family in ours.items():
        assert re.fullmatch(r"filepipe_[a-z0-9_]+", name), name
        assert family.documentation, name
        sample_names = {s.name for s in family.samples if isinstance(s, Sample)}
        if family.type == "counter":
            assert all(n.endswith(("_total", "_created")) for n in sample_names), name
        else:
            assert not name.endswith("_total"), name
        if family.type == "histogram":
            assert name.endswith(("_seconds", "_entries", "_bytes")), name
        assert not re.search(r"_(ms|milliseconds|minutes|kb|mb)(_|$)", name), name


def test_consume_command_serves_metrics(env: Env, tmp_path: Path) -> None:
    s = env.settings
    port = free_port()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("FILEPIPE_", "REDIS", "PG_", "CONSUMER"))}
    e.update(
        {
            "REDIS_URL": s.redis_url,
            "PG_URI": s.pg_uri,
            "STREAM_NAME": s.stream,
            "FILEPIPE_TABLE": s.table,
            "LOCAL_STORAGE_DIR": str(env.storage),
            "CONSUMER_BLOCK_MS": "100",
            "CONSUMER_NAME": "metrics-cli",
        }
    )
    add_good(env, 8)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "filepipe",
            "consume",
            "--quiet",
            "--metrics-port",
            str(port),
            "--metrics-allowed-host",
            "scraper.example",
        ],
        env=e,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def processed() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                _, samples = scrape(f"{base}/metrics")
            except httpx.TransportError:
                return False
            return value(samples, "filepipe_processed_total") == 8

        wait_for(processed, timeout=30, what="8 entries processed")
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.get(f"{base}/metrics", headers={"host": "scraper.example"}).status_code == 200
        assert httpx.get(f"{base}/metrics", headers={"host": "evil.example"}).status_code == 400
        families, samples = scrape(f"{base}/metrics")
        assert families["filepipe_consumer_info"].samples[0].labels["name"] == "metrics-cli"
        assert ("filepipe_lag_entries", (("group", s.group), ("stream", s.stream))) in samples
        assert "process_cpu_seconds" in families
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert env.rows() == 8


def test_consumer_metrics_show_what_is_kept_and_what_is_trimmed(env: Env) -> None:
    s = env.settings
    add_good(env, 50)
    env.redis.xgroup_create(s.stream, "other_app", id="0")
    consumer = Consumer(s, write=None)
    server = serve_metrics(0, consumer=consumer)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        _, before = scrape(url)
        with running(consumer):
            wait_for(lambda: env.rows() == 50, 20, "the rows")

            def kept(samples: Samples) -> float:
                return value(
                    samples,
                    "filepipe_stream_kept_entries",
                    stream=s.stream,
                    reason="unread",
                    group="other_app",
                )

            held = scrape_until(url, lambda smp: kept(smp) == 50, "the entries held by the other group")
            assert value(held, "filepipe_stream_entries", stream=s.stream) == 50
            assert value(held, "filepipe_stream_memory_bytes", stream=s.stream) > 0
            assert value(held, "filepipe_redis_memory_used_bytes", node="") > 0
            assert value(held, "filepipe_dead_letter_cap_entries", stream=s.stream) == 10_000
            # The other application reads and acknowledges: the next pass trims all 50.
            got = env.redis.xreadgroup("other_app", "o", {s.stream: ">"}, count=100)
            env.redis.xack(s.stream, "other_app", *[e[0] for e in got[0][1]])
            trimmed = "filepipe_trimmed_entries_total"
            wait_for(lambda: value(scrape(url)[1], trimmed) - value(before, trimmed) == 50, 10, "the trim")
            after = scrape_until(
                url, lambda smp: value(smp, "filepipe_stream_entries", stream=s.stream) == 0, "a new reading"
            )
            assert not [k for k in after if k[0] == "filepipe_stream_kept_entries"]
    finally:
        server.close()
