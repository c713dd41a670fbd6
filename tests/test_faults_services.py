"""Service faults: PostgreSQL restarted or down, Redis cutting or refusing connections,
a network that goes silent. The consumer waits each one out, says so in its log
(once, not in a flood), and ends exact: every good event loaded once, every poison
entry dead-lettered once, nothing pending.

Every test runs its own private Redis and PostgreSQL (and loopback proxies in front
of them), so stopping, cutting or stalling them touches nothing else."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis
from tests.support.processes import reap, restart_postgres, stop_postgres
from tests.support.proxy import TcpProxy
from tests.support.workload import Workload, seed, start_consumer, wait_ready

from filepipe.config import Settings, load_settings
from filepipe.consumer import Consumer, Stats
from filepipe.db import init_db
from filepipe.embedded import PostgresServer, RedisServer

# Short timeouts, so that a silent service is noticed within seconds.
SVC_SETTINGS: dict[str, Any] = {
    "batch_size": 200,
    "block_ms": 100,
    "claim_idle_ms": 1000,
    "max_file_bytes": 64 * 1024,
    "connect_timeout_s": 2,
    "statement_timeout_ms": 2000,
}


# -- private services -----------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def pg_server() -> Iterator[PostgresServer]:
    # Durable: with synchronous_commit off, a crash (immediate stop) loses the last
    # commits the server already confirmed, which no client can make up for.
    with PostgresServer(durable=True) as server:
        yield server


class Site:
    """One test's private services: settings for the consumer (possibly through
    proxies) and direct handles for the checks."""

    def __init__(
        self,
        redis_server: RedisServer,
        pg_server: PostgresServer,
        root: Path,
        *,
        redis_port: int | None = None,
        pg_port: int | None = None,
        **overrides: Any,
    ) -> None:
        tag = uuid.uuid4().hex[:10]
        self.pg_uri = pg_server.uri  # direct, for the checks
        self.redis = redis.Redis.from_url(redis_server.url, socket_timeout=10)
        self.storage = root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        redis_url = f"redis://127.0.0.1:{redis_port or redis_server.port}/0"
        pg_uri = f"postgresql://postgres@127.0.0.1:{pg_port or pg_server.port}/postgres"
        self.settings: Settings = load_settings(
            {
                "redis_url": redis_url,
                "pg_uri": pg_uri,
                "stream": f"fp_svc_{tag}",
                "group": "file_processors",
                "table": f"fp_svc_{tag}",
                "local_storage_dir": str(self.storage),
                "consumer_name": f"svc-{tag}",
                **SVC_SETTINGS,
                **overrides,
            },
            environ={},
            dotenv_path=None,
        )
        init_db(self.settings, plain=True)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_uri, connect_timeout=5) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def rows(self) -> int:
        return int(self.sql(f"SELECT count(*) FROM {self.settings.table}")[0][0])

    def pending(self) -> int:
        return int(self.redis.xpending(self.settings.stream, self.settings.group)["pending"])

    def acked(self) -> int:
        """Entries delivered to the group and acknowledged since."""
        for g in self.redis.xinfo_groups(self.settings.stream):
            if g["name"] in (self.settings.group, self.settings.group.encode()):
                return int(g["entries-read"] or 0) - int(g["pending"])
        return 0

    def seed(self, n: int, poison_every: int = 10) -> Workload:
        return seed(self.redis, self.settings, self.storage, n, poison_every=poison_every)

    def close(self) -> None:
        self.redis.close()


def assert_exact(site: Site, w: Workload) -> None:
    """rows == accepted events, no duplicates, nothing pending, the dead-letter stream
    holds exactly the poison entries (once each, with their reasons)."""
    loaded = [r[0].encode() for r in site.sql(f"SELECT stream_id FROM {site.settings.table}")]
    assert len(loaded) == w.good, f"{len(loaded)} rows for {w.good} good events"
    assert len(set(loaded)) == len(loaded), "a row was loaded twice"
    assert set(loaded) == set(w.ids) - set(w.poison)
    assert site.pending() == 0
    dead = dead_letters(site.redis, site.settings.dead_stream)
    sources = [f[b"source_id"] for f in dead]
    assert len(sources) == len(set(sources)), "a dead letter was written twice"
    assert {f[b"source_id"]: f[b"reason"].decode() for f in dead} == w.poison


def dead_letters(r: redis.Redis, dead_stream: str) -> list[dict[bytes, bytes]]:
    return [f for _, f in cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(dead_stream))]


# -- the consumer under test ----------------------------------------------------------


class Draining:
    """`Consumer(settings, drain=True).run()` in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer(settings, drain=True, write=None)
        self.stats: Stats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="consumer-under-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stats = self.consumer.run()
        except BaseException as e:  # reported by finish()
            self.error = e

    def alive(self) -> bool:
        return self.thread.is_alive()

    def finish(self, timeout: float = 60) -> Stats:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.consumer.stop()
            self.thread.join(10)
            raise AssertionError(f"the consumer did not finish draining within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats


def wait_for(what: str, cond: Callable[[], bool], timeout: float, poll: float = 0.02) -> float:
    """Waits until `cond()`; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - t0


def safe(fn: Callable[[], int]) -> Callable[[], int]:
    """`fn()`, or -1 while the service it asks is down."""

    def call() -> int:
        try:
            return fn()
        except (psycopg.Error, redis.RedisError):
            return -1

    return call


def progressing(site: Site, timeout: float = 30) -> float:
    """Seconds until the consumer commits and acknowledges something new."""
    rows, acked = site.rows(), site.acked()
    return wait_for("progress after the fault", lambda: site.rows() > rows and site.acked() > acked, timeout)


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n  {line}", end="")


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="filepipe")
    return caplog


# -- PostgreSQL -----------------------------------------------------------------------


def test_postgres_restarted_immediate_mid_run(
    redis_server: RedisServer,
    pg_server: PostgresServer,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = Site(redis_server, pg_server, tmp_path)
    w = site.seed(20_000, poison_every=10)
    c = Draining(site.settings)
    wait_for("first rows", lambda: site.rows() > 0, 30)
    restart_postgres(pg_server, "immediate")  # SIGQUIT: backends die mid-COPY, like a crash
    recovery = progressing(site)
    assert c.alive()
    stats = c.finish(120)
    report(capsys, f"PostgreSQL immediate restart: progressing again {recovery:.2f} s after it was back")
    assert stats.inserted <= w.good
    assert warnings_with(logs, "PostgreSQL unreachable") and warnings_with(logs, "PostgreSQL is back")
    assert_exact(site, w)
    site.close()


def test_postgres_down_20_s_is_waited_out(
    redis_server: RedisServer, pg_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site(redis_server, pg_server, tmp_path)
    w = site.seed(20_000, poison_every=10)
    log = tmp_path / "consumer.log"
    proc = start_consumer(site.settings, "patient", "--drain", log=log)
    try:
        wait_ready(site.redis, site.settings, "patient", proc)
        wait_for("first rows", lambda: site.rows() > 0, 30)
        stop_postgres(pg_server, "fast")
        t_down = time.monotonic()
        time.sleep(1.0)  # the batch being committed as the server went down is acknowledged by now
        acked, dead = site.acked(), site.redis.xlen(site.settings.dead_stream)
        while time.monotonic() - t_down < 20:
            assert proc.poll() is None, f"the consumer exited during the outage:\n{log.read_text()}"
            # Nothing is acknowledged, and no dead letter written, while nothing can be committed.
            assert site.acked() == acked and site.redis.xlen(site.settings.dead_stream) == dead
            assert site.pending() > 0
            time.sleep(0.25)
        assert acked < len(w.ids)
        pg_server.start()
        # Bounded by the backoff's cap (15 s) plus one pool wait.
        recovery = progressing(site, timeout=45)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        reap(proc)
    text = log.read_text()
    report(capsys, f"PostgreSQL down 20 s: progressing again {recovery:.2f} s after it was back")
    down = [line for line in text.splitlines() if "PostgreSQL unreachable" in line]
    back = [line for line in text.splitlines() if "PostgreSQL is back after" in line]
    assert len(down) == 1, text
    assert len(text.splitlines()) < 12, f"a flood of log lines:\n{text}"
    assert len(back) == 1 and float(back[0].split("back after ")[1].split(" s")[0]) >= 19, text
    assert "Traceback" not in text
    assert_exact(site, w)
    site.close()


def test_entries_in_hand_stay_claimed_through_an_outage(
    redis_server: RedisServer, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """PostgreSQL down four times CLAIM_IDLE_MS: the entries the consumer holds are claimed
    again while it waits (XCLAIM JUSTID, every half CLAIM_IDLE_MS), so they never look idle
    long enough for another consumer to take them over as a dead consumer's."""
    # Batches of 20: the drain is still going when PostgreSQL stops.
    site = Site(redis_server, pg_server, tmp_path, batch_size=20)
    s = site.settings
    w = site.seed(20_000, poison_every=10)
    log = tmp_path / "consumer.log"
    proc = start_consumer(s, "holder", "--drain", log=log)
    try:
        wait_ready(site.redis, s, "holder", proc)
        wait_for("first rows", lambda: site.rows() > 0, 30)
        stop_postgres(pg_server, "fast")
        t_down = time.monotonic()
        idle = 0
        while time.monotonic() - t_down < 4 * s.claim_idle_ms / 1000:
            held = site.redis.xpending_range(s.stream, s.group, "-", "+", 10_000, consumername="holder")
            assert held, "the consumer holds entries while PostgreSQL is down"
            idle = max(idle, *(int(r["time_since_delivered"]) for r in held))
            time.sleep(0.1)
        assert idle < s.claim_idle_ms, f"an entry in hand was idle {idle} ms"
        # Another consumer's XAUTOCLAIM finds nothing idle enough to take over.
        assert site.redis.xautoclaim(s.stream, s.group, "other", s.claim_idle_ms, justid=True) == []
        pg_server.start()
        assert proc.wait(120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_exact(site, w)
    site.close()


def test_postgres_connection_stalled_is_cut_and_resumed(
    redis_server: RedisServer,
    pg_server: PostgresServer,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with TcpProxy(pg_server.port) as proxy:
        site = Site(redis_server, pg_server, tmp_path, pg_port=proxy.port)
        w = site.seed(20_000, poison_every=10)
        c = Draining(site.settings)
        wait_for("first rows", lambda: site.rows() > 0, 30)
        proxy.stall()  # a silent network: connections stay open, nothing gets through
        t_stall = time.time()
        # statement_timeout 2 s + max(2, connect_timeout 2 s) = 4 s, then the watchdog cuts.
        detected = wait_for(
            "the silent connection noticed",
            lambda: bool(warnings_with(logs, "connection silent") or warnings_with(logs, "did not answer")),
            15,
        )
        first = min(r.created for r in warnings_with(logs, "silent") + warnings_with(logs, "did not answer"))
        rows, acked = site.rows(), site.acked()
        time.sleep(1.0)
        assert c.alive() and site.rows() == rows and site.acked() == acked
        proxy.resume()
        recovery = progressing(site)
        stats = c.finish(120)
        site.close()
    report(
        capsys,
        f"PostgreSQL stall: noticed after {first - t_stall:.2f} s (log seen by the test after "
        f"{detected:.2f} s); progressing {recovery:.2f} s after resume",
    )
    assert first - t_stall < 15
    assert stats.inserted <= w.good
    assert_exact(site, w)


def test_a_pooled_connection_gone_silent_is_cut_by_the_check(
    pg_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The pool tests an idle connection before handing it out, before the load's
    watchdog starts: that test must not wait forever on a silent network either."""
    from psycopg_pool import PoolTimeout

    from filepipe import db

    monkeypatch.setattr(db.connection, "CHECK_AFTER_IDLE_S", 0.0)  # every connection counts as idle
    with TcpProxy(pg_server.port) as proxy:
        settings = load_settings(
            {
                "redis_url": "redis://127.0.0.1:1/0",
                "pg_uri": f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres",
                "local_storage_dir": str(tmp_path),
                **SVC_SETTINGS,
            },
            environ={},
            dotenv_path=None,
        )
        pool = db.create_pool(settings)
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
            proxy.stall()
            outcome: list[BaseException | None] = []

            def get() -> None:
                try:
                    with pool.connection():
                        outcome.append(None)
                except BaseException as e:
                    outcome.append(e)

            t0 = time.monotonic()
            getter = threading.Thread(target=get, daemon=True)
            getter.start()
            getter.join(15)
            waited = time.monotonic() - t0
            proxy.resume()
            getter.join(5)
            assert waited < 15, "asking the pool for a connection hung on the silent network"
            assert outcome and isinstance(outcome[0], (PoolTimeout, psycopg.OperationalError)), outcome
            with pool.connection() as conn:  # and the pool recovers
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pool.close()
    report(capsys, f"pool check on a silent connection: gave up after {waited:.2f} s")


# -- Redis ------------------------------------------------------------------------------


def test_redis_connections_killed_repeatedly(
    redis_server: RedisServer,
    pg_server: PostgresServer,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Small batches, and 2 ms each way to Redis: many round trips for the kills to land
    # in, and a backlog that outlasts them however fast the consumer gets.
    with TcpProxy(redis_server.port, delay_ms=2) as proxy:
        site = Site(redis_server, pg_server, tmp_path, redis_port=proxy.port, batch_size=20)
        w = site.seed(10_000, poison_every=10)
        c = Draining(site.settings)
        wait_for("first rows", lambda: site.rows() > 0, 30)
        kills = killed = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0 and c.alive():
            # Every client but the test's own: the consumer's reads, acks and heartbeats.
            killed += int(
                site.redis.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
                )
            )
            kills += 1
            time.sleep(0.2)
        t_end = time.monotonic()
        rows_at_end = site.rows()
        assert rows_at_end < w.good, "drained before the kills stopped: the backlog is too small"
        stats = c.finish(120)
        done = time.monotonic() - t_end
        site.close()
    report(
        capsys,
        f"Redis clients killed {kills} times ({killed} connections): "
        f"{rows_at_end} rows when the kills stopped, drained {done:.2f} s later",
    )
    assert kills >= 10 and killed >= 10
    assert warnings_with(logs, "Redis unreachable")
    assert stats.inserted <= w.good
    assert_exact(site, w)


def test_redis_connection_stalled_times_out_and_resumes(
    redis_server: RedisServer,
    pg_server: PostgresServer,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with TcpProxy(redis_server.port) as proxy:
        site = Site(redis_server, pg_server, tmp_path, redis_port=proxy.port)
        w = site.seed(20_000, poison_every=10)
        c = Draining(site.settings)
        wait_for("first rows", lambda: site.rows() > 0, 30)
        proxy.stall()
        t_stall = time.time()
        # socket timeout: block 0.1 s + max(2, connect_timeout 2 s) = 2.1 s
        detected = wait_for(
            "the silent Redis noticed", lambda: bool(warnings_with(logs, "Redis unreachable")), 15
        )
        first = min(r.created for r in warnings_with(logs, "Redis unreachable"))
        time.sleep(2.0)
        acked = site.acked()
        time.sleep(1.0)
        assert c.alive() and site.acked() == acked
        proxy.resume()
        recovery = progressing(site)
        stats = c.finish(120)
        site.close()
    report(
        capsys,
        f"Redis stall: noticed after {first - t_stall:.2f} s (log seen by the test after "
        f"{detected:.2f} s); progressing {recovery:.2f} s after resume",
    )
    assert first - t_stall < 15
    assert warnings_with(logs, "Redis is back")
    assert stats.inserted <= w.good
    assert_exact(site, w)


def test_redis_cut_then_refusing_for_5_s(
    redis_server: RedisServer,
    pg_server: PostgresServer,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis restarting, as the consumer sees it: its connections reset, then nothing
    accepts for a while. (A real restart of a Redis without persistence would lose the
    stream itself, which is not the consumer's to recover.)"""
    # Batches of 50 and 2 ms each way: the drain lasts several seconds, past the faults.
    with TcpProxy(redis_server.port, delay_ms=2) as proxy:
        site = Site(redis_server, pg_server, tmp_path, redis_port=proxy.port, batch_size=50)
        w = site.seed(20_000, poison_every=10)
        c = Draining(site.settings)
        wait_for("first rows", lambda: site.rows() > 0, 30)
        for _ in range(3):
            proxy.cut()
            time.sleep(0.3)
        proxy.refuse()
        time.sleep(1.0)
        acked = site.acked()
        assert acked < len(w.ids), "drained before Redis refused: the backlog is too small"
        time.sleep(4.0)
        assert c.alive(), (c.error, c.stats)
        assert site.acked() == acked
        proxy.resume()
        recovery = progressing(site)
        stats = c.finish(120)
        site.close()
    report(
        capsys, f"Redis cut 3 times then refusing 5 s: progressing {recovery:.2f} s after it accepted again"
    )
    down = warnings_with(logs, "Redis unreachable")
    assert down and warnings_with(logs, "Redis is back")
    assert stats.inserted <= w.good
    assert_exact(site, w)


def test_an_ack_run_twice_writes_each_dead_letter_once(redis_server: RedisServer) -> None:
    """A lost reply, a late retransmission from a cut connection, or the same entries
    reclaimed by another consumer while this one was stalled: the acknowledgement then
    runs twice, and must not write the dead letters twice."""
    from filepipe import dlq, stream
    from filepipe.stream import DeadLetter

    r = redis.Redis.from_url(redis_server.url)
    s, g, dead_stream = "fp_svc_ack", "file_processors", "fp_svc_ack:dead"
    stream.ensure_group(r, s, g)
    ids = [cast(bytes, r.xadd(s, {"file_id": "x", "n": str(i)})) for i in range(50)]
    wide = {f"f{i}".encode(): b"v" for i in range(5000)}  # more fields than Lua can unpack at once
    ids.append(cast(bytes, r.xadd(s, wide)))  # type: ignore[arg-type]
    r.xreadgroup(g, "a", {s: ">"}, count=100)
    dead = [
        DeadLetter(ids[3], {b"file_id": b"x", b"reason": b"own"}, "bad_uuid", "not a uuid"),
        DeadLetter(ids[-1], wide, "missing_field", "no filename"),
    ]
    first = stream.ack(r, s, g, ids, dead, dead_stream=dead_stream, consumer="a")
    assert first.acked == 51 and first.written == dead
    again = stream.ack(r, s, g, ids, dead, dead_stream=dead_stream, consumer="b")
    assert again.acked == 0 and not again.written and again.skipped == dead
    letters = dead_letters(r, dead_stream)
    assert [f[b"source_id"] for f in letters] == [ids[3], ids[-1]]
    assert letters[0][b"reason"] == b"bad_uuid" and letters[0][b"consumer"] == b"a"
    own = [d.original() for d in dlq.scan(r, dead_stream)]
    assert own[0] == [(b"file_id", b"x"), (b"reason", b"own")]  # the entry's own `reason`, kept
    assert letters[1][b"reason"] == b"missing_field" and letters[1][b"consumer"] == b"a"
    # More fields than a dead letter holds whole: an excerpt of the first thousand, marked.
    assert json.loads(letters[1][b"truncated"])["fields"] == 5000 and b"fields_dropped" not in letters[1]
    assert own[1] == list(wide.items())[:1000]
    assert r.xpending(s, g)["pending"] == 0
    r.close()


def test_one_outage_one_warning_with_loaders_sharing_the_backoff(caplog: pytest.LogCaptureFixture) -> None:
    """Loaders share one backoff: a load that got through just before the server went
    away must not announce "is back" (and then "unreachable" again) in the middle of
    the outage; only an attempt begun after the outage was noticed ends it."""
    from filepipe.retry import Backoff

    caplog.set_level(logging.INFO, logger="filepipe")
    stop = threading.Event()
    stop.set()  # no sleeping between attempts here
    b = Backoff("PostgreSQL", stop=stop)
    before = time.monotonic()
    b.failed(psycopg.OperationalError("server closed the connection unexpectedly"))
    b.succeeded(started=before)  # the other loader's COMMIT, sent before the outage
    b.failed(psycopg.OperationalError("server closed the connection unexpectedly"))
    for _ in range(20):  # errors that alternate or vary
        b.failed(psycopg.OperationalError("couldn't get a connection after 5.00 sec"))
        b.failed(psycopg.OperationalError(f"connection refused ({uuid.uuid4().hex[:4]})"))
    b.succeeded(started=time.monotonic())
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "PostgreSQL unreachable" in x]) == 1, lines
    assert len([x for x in lines if "PostgreSQL is back" in x]) == 1, lines
    assert len(lines) <= 6, lines


def test_a_read_that_gets_through_does_not_end_a_refusal_of_writes(caplog: pytest.LogCaptureFixture) -> None:
    """Redis refusing writes (a failed snapshot, a replica, a full Redis) still answers
    reads: the acknowledger asking which entries are still pending (XPENDING) after its
    script was refused gets an answer, but the refusal goes on, so it is not "back"."""
    import redis

    from filepipe.retry import Backoff, Outage, is_transient_redis

    caplog.set_level(logging.INFO, logger="filepipe")
    stop = threading.Event()
    stop.set()
    outage = Outage("Redis")
    acker, reader = Backoff("Redis", stop=stop, outage=outage), Backoff("Redis", stop=stop, outage=outage)
    refused = redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it can't persist")
    for _ in range(5):
        acker.failed(refused)
        assert acker.call(lambda: {b"1-0"}, is_transient_redis, writes=False) == {b"1-0"}
    reader.call(lambda: None, is_transient_redis)  # a read of the reader's: not a write either
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "MISCONF" in x and "refuses writes" in x]) == 1, lines
    assert not [x for x in lines if "is back" in x], lines
    acker.succeeded()  # the script ran: writes are taken again
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "Redis is back" in x]) == 1, lines
