"""The events table refusing rows: a constraint, trigger or NOT NULL column no row
satisfies, a revoked privilege, a read-only database, a failover to a standby, a
statement timeout. When the table refuses every row, that is the table's problem: the
consumer keeps the batch pending, says so once (log, heartbeat, status, readiness) and
resumes by itself once the table accepts rows again, with nothing dead-lettered. A row
refused while rows like it load is the entry's problem: it alone is dead-lettered.

Tests that change server settings or roles run their own PostgreSQL; tests that only
change the table use a table of their own on the shared server. The refusals the trial
row must tell from bad entries (a CHECK, a trigger, a NOT NULL column, a revoked
privilege, a read-only server) run on a plain table and on a hypertable (TimescaleDB
preloaded: the shared test cluster, or a private one)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from tests.conftest import HYPERTABLE, PLAIN, Env, both_tables
from tests.support.processes import reap, stop_postgres
from tests.support.proxy import TcpProxy
from tests.support.standby import start_standby, wait_replayed
from tests.support.workload import Workload, seed, start_consumer
from tests.test_faults_services import SVC_SETTINGS, Draining, assert_exact, report, wait_for, warnings_with

from filepipe import status
from filepipe.config import load_settings
from filepipe.constants import heartbeat_key
from filepipe.consumer import Consumer
from filepipe.dashboard.monitor import Monitor
from filepipe.db import init_db
from filepipe.embedded import PostgresServer
from filepipe.observe.export import serve_metrics

REFUSING = "refuses rows"
ACCEPTING = "accepts rows again after"


# A consumer waiting refreshes its heartbeat every few seconds: not "silent".
TABLE_SETTINGS = {**SVC_SETTINGS, "claim_idle_ms": 15_000}


@pytest.fixture
def tenv(env: Env) -> Env:
    env.settings = env.settings_with(**TABLE_SETTINGS)
    return env


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="filepipe")
    return caplog


@pytest.fixture
def pg_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """A private PostgreSQL; parametrized by `private_tables`, one preloading TimescaleDB
    whose events table is a hypertable."""
    preload = ("timescaledb",) if getattr(request, "param", PLAIN) == HYPERTABLE else ()
    with PostgresServer(preload=preload) as server:
        yield server


# Runs a test on a private server's plain table and on a private TimescaleDB's hypertable.
private_tables = pytest.mark.parametrize("pg_server", [PLAIN, HYPERTABLE], indirect=True)


@contextlib.contextmanager
def private_env(
    redis_url: str, pg_uri: str, check_uri: str, tmp_path: Path, *, hypertable: bool = False
) -> Iterator[Env]:
    """A stream of its own on the shared Redis; a consumer's PostgreSQL at `pg_uri` (a
    private server, maybe through a proxy), checked at `check_uri`; a plain table, or a
    hypertable."""
    tag = uuid.uuid4().hex[:10]
    storage = tmp_path / "storage"
    storage.mkdir()
    settings = load_settings(
        {
            "redis_url": redis_url,
            "pg_uri": pg_uri,
            "stream": f"fp_table_{tag}",
            "group": "file_processors",
            "table": f"fp_table_{tag}",
            "local_storage_dir": str(storage),
            "consumer_name": f"table-{tag}",
            **TABLE_SETTINGS,
        },
        environ={},
        dotenv_path=None,
    )
    assert init_db(settings, plain=not hypertable).hypertable == hypertable
    r = redis.Redis.from_url(redis_url)
    try:
        yield Env(settings=settings, redis=r, pg_uri=check_uri, storage=storage, hypertable=hypertable)
    finally:
        for key in r.scan_iter(match=f"*fp_table_{tag}*"):
            r.delete(key)
        r.close()


@pytest.fixture
def penv(redis_url: str, pg_server: PostgresServer, tmp_path: Path) -> Iterator[Env]:
    hypertable = "timescaledb" in pg_server.preload
    with private_env(redis_url, pg_server.uri, pg_server.uri, tmp_path, hypertable=hypertable) as env:
        yield env


def acked(env: Env) -> int:
    """Entries delivered to the group and acknowledged since."""
    for g in env.redis.xinfo_groups(env.settings.stream):
        if g["name"] in (env.settings.group, env.settings.group.encode()):
            return int(g["entries-read"] or 0) - int(g["pending"])
    return 0


def holds_still(env: Env, alive: Callable[[], bool], seconds: float = 2.0) -> int:
    """For `seconds`, the consumer keeps running and neither acknowledges nor dead-letters
    anything; returns the entries acknowledged."""
    done, dead = acked(env), env.redis.xlen(env.settings.dead_stream)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        assert alive(), "the consumer stopped while the table refused rows"
        assert acked(env) == done and env.redis.xlen(env.settings.dead_stream) == dead
        time.sleep(0.2)
    return done


def combined(a: Workload, b: Workload) -> Workload:
    return Workload(good=a.good + b.good, poison={**a.poison, **b.poison}, ids=a.ids + b.ids)


def heartbeat(env: Env) -> dict[str, Any]:
    raw = env.redis.get(heartbeat_key(env.settings.stream, env.settings.consumer_name))
    return json.loads(raw) if raw else {}


def admin(uri: str, *statements: str) -> None:
    """Runs statements as the superuser, on a session that may write even when the
    database's default is read-only."""
    with psycopg.connect(uri, autocommit=True, options="-c default_transaction_read_only=off") as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def waits_out_refusal(
    env: Env,
    logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    refuse: Callable[[], None],
    accept: Callable[[], None],
    sqlstate: str,
    *,
    loaded_before: int = 50,
    events: int = 1000,
    metrics: bool = False,
) -> None:
    """Rows load; the table starts refusing every row; the consumer waits, keeps every
    entry pending, shows why, and once the table accepts rows again loads everything:
    exact counts, no entry dead-lettered for the refusal."""
    s = env.settings
    first = Workload()
    if loaded_before:
        first = seed(env.redis, s, env.storage, loaded_before)
        Draining(s).finish(60)
    refuse()
    w = seed(env.redis, s, env.storage, events, poison_every=10)
    c = Draining(s)
    wait_for("the refusal logged", lambda: bool(warnings_with(logs, REFUSING)), 30)
    wait_for("the refusal in the heartbeat", lambda: REFUSING in heartbeat(env).get("last_error", ""), 15)
    last_error = heartbeat(env)["last_error"]
    assert sqlstate in last_error, last_error
    assert env.redis.xlen(s.dead_stream) == 0
    assert holds_still(env, c.alive) == loaded_before
    assert env.pending() > 0
    st = status.collect_status(s)
    assert st.health == "degraded", st.problems
    shown = [p for p in st.problems if REFUSING in p]
    assert shown and sqlstate in shown[0], st.problems
    text = status.render(st)
    assert REFUSING in text and sqlstate in text
    monitor = Monitor(s)  # what the dashboard shows
    try:
        [shown_live] = [x for x in monitor.sample()["consumers"] if x["name"] == s.consumer_name]
    finally:
        monitor.stop()
    assert REFUSING in shown_live["last_error"] and sqlstate in shown_live["last_error"], shown_live
    with contextlib.ExitStack() as stack:
        if metrics:
            server = stack.enter_context(serve_metrics(0, consumer=c.consumer))
            base = f"http://127.0.0.1:{server.port}"
            assert httpx.get(f"{base}/healthz").status_code == 200  # alive: a restart would not help
            ready = httpx.get(f"{base}/readyz", timeout=10)
            assert ready.status_code == 503 and sqlstate in ready.json()["checks"]["table"], ready.text
            assert "filepipe_table_refusing_rows 1.0" in httpx.get(f"{base}/metrics", timeout=10).text
        accept()
        stats = c.finish(120)
        if metrics:
            ready = httpx.get(f"{base}/readyz", timeout=10)
            assert ready.json()["checks"]["table"] == "ok", ready.text
            assert "filepipe_table_refusing_rows 0.0" in httpx.get(f"{base}/metrics", timeout=10).text
    assert stats.inserted == w.good
    lines = [r.getMessage() for r in logs.records]
    refused = [x for x in lines if REFUSING in x]
    back = [x for x in lines if ACCEPTING in x]
    assert len([r for r in warnings_with(logs, REFUSING) if r.levelname == "WARNING"]) == 1, lines
    assert len(back) == 1, lines
    assert not [x for x in lines if "PostgreSQL refused the row" in x], lines
    assert_exact(env, combined(first, w))
    shown_lines = [x for x in text.splitlines() if REFUSING in x]
    report(capsys, "\n  ".join([*refused, *back, *shown_lines]))


# -- the table changes (a table of its own on the shared server) ------------------------


@both_tables
def test_a_check_constraint_no_row_satisfies_is_waited_out(
    tenv: Env, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    t = tenv.settings.table
    waits_out_refusal(
        tenv,
        logs,
        capsys,
        lambda: tenv.sql(f"ALTER TABLE {t} ADD CONSTRAINT {t}_frozen CHECK (size_bytes < 0) NOT VALID"),
        lambda: tenv.sql(f"ALTER TABLE {t} DROP CONSTRAINT {t}_frozen"),
        "23514",
        metrics=True,
    )


def only_before_now(env: Env) -> None:
    """A rule the rows loaded so far pass and every event from now on breaks."""
    t = env.settings.table
    cutoff = env.sql("SELECT now()::text")[0][0]
    env.sql(f"ALTER TABLE {t} ADD CONSTRAINT {t}_before CHECK (event_time < '{cutoff}') NOT VALID")


def test_a_rule_only_new_rows_break_is_waited_out(
    tenv: Env, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table still takes its newest row again (the trial row passes), but every new
    row breaks the rule: that is the table's problem too, not a thousand entries' (their
    dead letters would fill the capped dead-letter stream and drop the oldest)."""
    t = tenv.settings.table
    waits_out_refusal(
        tenv,
        logs,
        capsys,
        lambda: only_before_now(tenv),
        lambda: tenv.sql(f"ALTER TABLE {t} DROP CONSTRAINT {t}_before"),
        "23514",
    )
    assert any("a rule new rows break" in r.getMessage() for r in warnings_with(logs, REFUSING))


def test_a_trickle_of_rows_a_new_rule_refuses_dead_letters_only_a_few(tenv: Env) -> None:
    """One entry per batch, every one refused the same way while the
    table takes its newest row again: fewer than SAME_REFUSALS_FOR_THE_TABLE are
    dead-lettered, then the consumer waits; once the rule is gone everything loads."""
    from filepipe.constants import SAME_REFUSALS_FOR_THE_TABLE as SAME

    s = tenv.settings
    t = s.table
    first = seed(tenv.redis, s, tenv.storage, 20)
    Draining(s).finish(60)
    only_before_now(tenv)
    w = seed(tenv.redis, s, tenv.storage, SAME + 5)
    c = Draining(tenv.settings_with(batch_size=1, in_flight=1, pool_size=1))
    wait_for("the refusal in the heartbeat", lambda: REFUSING in heartbeat(tenv).get("last_error", ""), 30)
    dead = tenv.redis.xlen(s.dead_stream)
    assert 0 < dead < SAME, dead
    holds_still(tenv, c.alive)
    tenv.sql(f"ALTER TABLE {t} DROP CONSTRAINT {t}_before")
    stats = c.finish(120)
    assert stats.dead_lettered == dead
    assert tenv.rows() == first.good + w.good - dead
    assert tenv.pending() == 0


@both_tables
def test_a_trigger_that_raises_is_waited_out(
    tenv: Env, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    t = tenv.settings.table
    try:
        waits_out_refusal(
            tenv,
            logs,
            capsys,
            lambda: tenv.sql(
                f"CREATE FUNCTION {t}_freeze() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$BEGIN RAISE EXCEPTION 'uploads are frozen for maintenance'; END$$;"
                f"CREATE TRIGGER {t}_freeze BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_freeze()"
            ),
            lambda: tenv.sql(f"DROP TRIGGER {t}_freeze ON {t}"),
            "P0001",
        )
    finally:
        tenv.sql(f"DROP FUNCTION IF EXISTS {t}_freeze() CASCADE")


@both_tables
def test_a_not_null_column_without_default_is_waited_out_on_an_empty_table(
    tenv: Env, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing loaded yet, so no row of the table to compare with: the consumer tries a
    row made up by itself, which the table refuses as well."""
    t = tenv.settings.table
    waits_out_refusal(
        tenv,
        logs,
        capsys,
        lambda: tenv.sql(f"ALTER TABLE {t} ADD COLUMN region text NOT NULL"),
        lambda: tenv.sql(f"ALTER TABLE {t} ALTER COLUMN region SET DEFAULT 'eu'"),
        "23502",
        loaded_before=0,
    )


# -- the server changes (a private PostgreSQL) -------------------------------------------


@private_tables
def test_a_revoked_insert_privilege_is_waited_out(
    penv: Env, pg_server: PostgresServer, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    t = penv.settings.table
    admin(pg_server.uri, "CREATE ROLE fp_writer LOGIN", f"GRANT SELECT, INSERT ON {t} TO fp_writer")
    penv.settings = penv.settings_with(pg_uri=f"postgresql://fp_writer@127.0.0.1:{pg_server.port}/postgres")
    waits_out_refusal(
        penv,
        logs,
        capsys,
        lambda: admin(pg_server.uri, f"REVOKE INSERT ON {t} FROM fp_writer"),
        lambda: admin(pg_server.uri, f"GRANT INSERT ON {t} TO fp_writer"),
        "42501",
    )


@private_tables
def test_a_read_only_server_is_waited_out(
    penv: Env, pg_server: PostgresServer, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """`default_transaction_read_only` set in the server's configuration: it applies to
    the consumer's open connections at the reload."""
    waits_out_refusal(
        penv,
        logs,
        capsys,
        lambda: admin(
            pg_server.uri, "ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()"
        ),
        lambda: admin(
            pg_server.uri, "ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()"
        ),
        "25006",
    )


def test_consume_waits_out_a_read_only_database_then_drains_and_exits_0(
    penv: Env, pg_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`filepipe consume --drain` as a user runs it: once read-only, it used to exit 1."""
    s = penv.settings
    first = seed(penv.redis, s, penv.storage, 50)
    Draining(s).finish(60)
    w = seed(penv.redis, s, penv.storage, 2000, poison_every=10)
    log = tmp_path / "consumer.log"
    admin(pg_server.uri, "ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()")
    proc = start_consumer(s, s.consumer_name, "--drain", log=log)
    try:
        wait_for("the refusal logged", lambda: REFUSING in log.read_text(), 30)
        assert holds_still(penv, lambda: proc.poll() is None) == 50
        admin(pg_server.uri, "ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()")
        assert proc.wait(120) == 0, log.read_text()
    finally:
        reap(proc)
    text = log.read_text()
    assert "Traceback" not in text
    assert len([x for x in text.splitlines() if REFUSING in x]) == 1, text
    assert len([x for x in text.splitlines() if ACCEPTING in x]) == 1, text
    assert len(text.splitlines()) < 8, f"a flood of log lines:\n{text}"
    assert_exact(penv, combined(first, w))
    report(capsys, "\n  ".join(text.splitlines()))


def test_a_stop_while_the_table_refuses_rows_leaves_the_batches_pending(tenv: Env) -> None:
    t = tenv.settings.table
    seed(tenv.redis, tenv.settings, tenv.storage, 10)
    Draining(tenv.settings).finish(60)
    tenv.sql(f"ALTER TABLE {t} ADD CONSTRAINT {t}_frozen CHECK (size_bytes < 0) NOT VALID")
    w = seed(tenv.redis, tenv.settings, tenv.storage, 300)
    consumer = Consumer(tenv.settings, write=None, stop_timeout=2.0)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_for("the refusal", lambda: bool(consumer.table_refusal()), 30)
    t0 = time.monotonic()
    consumer.stop()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - t0 < 10
    assert tenv.rows() == 10 and tenv.redis.xlen(tenv.settings.dead_stream) == 0
    assert tenv.pending() > 0 and acked(tenv) == 10
    tenv.sql(f"ALTER TABLE {t} DROP CONSTRAINT {t}_frozen")
    Draining(tenv.settings).finish(60)
    assert tenv.rows() == 10 + w.good and tenv.pending() == 0


def test_a_database_made_read_only_for_new_sessions_is_waited_out(
    penv: Env, pg_server: PostgresServer, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ALTER DATABASE … SET default_transaction_read_only = on` and the sessions cut
    (as a switchover does): every new connection is read-only, which its staging table
    cannot survive either. When the setting is reset, the consumer must not keep its
    read-only sessions for good."""
    cut = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'filepipe'"
    waits_out_refusal(
        penv,
        logs,
        capsys,
        lambda: admin(pg_server.uri, "ALTER DATABASE postgres SET default_transaction_read_only = on", cut),
        lambda: admin(pg_server.uri, "ALTER DATABASE postgres RESET default_transaction_read_only"),
        "25006",
    )


def test_a_failover_to_a_read_only_standby_is_waited_out_until_it_is_promoted(
    redis_url: str, tmp_path: Path, logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The address the consumer uses moves from the primary to a hot standby (read-only:
    25006 on every write), which is promoted a while later."""
    with PostgresServer() as primary, TcpProxy(primary.port) as proxy:
        standby = start_standby(primary)
        try:
            through = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
            with private_env(redis_url, through, primary.uri, tmp_path) as env:
                r, settings, storage = env.redis, env.settings, env.storage
                w = seed(r, settings, storage, 20_000, poison_every=10)
                c = Draining(settings)
                wait_for("first rows", lambda: env.rows() > 0, 30)
                proxy.refuse()  # the primary is gone
                wait_replayed(primary, standby)
                stop_postgres(primary, "fast")
                env.pg_uri = standby.uri
                proxy.target_port = standby.port  # the address now leads to the standby
                proxy.resume()
                wait_for("the refusal logged", lambda: bool(warnings_with(logs, REFUSING)), 60)
                done = holds_still(env, c.alive)
                assert done < len(w.ids)
                wait_for(
                    "the refusal in the heartbeat",
                    lambda: "25006" in heartbeat(env).get("last_error", ""),
                    15,
                )
                admin(standby.uri, "SELECT pg_promote()")
                c.finish(120)
                assert_exact(env, w)
        finally:
            standby.close()
    lines = [rec.getMessage() for rec in logs.records]
    assert len([x for x in lines if REFUSING in x and "still" not in x]) == 1, lines
    assert len([x for x in lines if ACCEPTING in x]) == 1, lines
    report(capsys, "\n  ".join(x for x in lines if "PostgreSQL" in x))


# -- rows refused while rows like them load: dead-lettered, one by one -------------------


def test_one_bad_entry_alone_in_an_idle_stream_is_dead_lettered(
    tenv: Env, logs: pytest.LogCaptureFixture
) -> None:
    """The ambiguous case: the batch's only row fails. The table still takes a row like
    the ones it holds, so the entry is at fault: dead-lettered, and the drain ends."""
    t = tenv.settings.table
    first = seed(tenv.redis, tenv.settings, tenv.storage, 30)
    Draining(tenv.settings).finish(60)
    tenv.sql(f"ALTER TABLE {t} ADD CONSTRAINT {t}_named CHECK (filename <> 'refuse me')")
    bad = tenv.xadd({"file_id": str(uuid.uuid4()), "filename": "refuse me", "key": "data/0001.txt"})
    stats = Draining(tenv.settings).finish(60)
    assert stats.inserted == 0 and stats.dead_lettered == 1
    assert_exact(tenv, combined(first, Workload(poison={bad: "db_rejected"}, ids=[bad])))
    ((_, fields),) = tenv.dead()
    assert b"refuse me" in fields[b"filename"] and b"_named" in fields[b"error"]
    assert not warnings_with(logs, REFUSING)


def test_one_bad_entry_alone_on_an_empty_table_is_dead_lettered(
    tenv: Env, logs: pytest.LogCaptureFixture
) -> None:
    """No row in the table to compare with: a row the consumer makes up is taken, so the
    entry is at fault."""
    t = tenv.settings.table
    tenv.sql(f"ALTER TABLE {t} ADD CONSTRAINT {t}_named CHECK (filename <> 'refuse me')")
    seed(tenv.redis, tenv.settings, tenv.storage, 0)
    bad = tenv.xadd({"file_id": str(uuid.uuid4()), "filename": "refuse me", "key": "data/0001.txt"})
    stats = Draining(tenv.settings).finish(60)
    assert stats.dead_lettered == 1 and tenv.rows() == 0 and tenv.pending() == 0
    assert [f[b"source_id"] for _, f in tenv.dead()] == [bad]
    assert not warnings_with(logs, REFUSING)


def test_a_trigger_refusing_some_rows_dead_letters_only_those(
    tenv: Env, logs: pytest.LogCaptureFixture
) -> None:
    t = tenv.settings.table
    try:
        tenv.sql(
            f"CREATE FUNCTION {t}_picky() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$BEGIN IF NEW.filename LIKE '%7.txt' THEN RAISE EXCEPTION 'no sevens: %', NEW.filename; "
            f"END IF; RETURN NEW; END$$;"
            f"CREATE TRIGGER {t}_picky BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_picky()"
        )
        w = seed(tenv.redis, tenv.settings, tenv.storage, 500, poison_every=10)
        sevens = {i for i, n in zip(w.ids, range(500), strict=True) if n % 10 == 7}
        for i in sevens:
            w.poison[i] = "db_rejected"
        w.good -= len(sevens)
        stats = Draining(tenv.settings).finish(120)
        assert stats.inserted == w.good == 400
        assert_exact(tenv, w)
        assert all(b"no sevens" in f[b"error"] for _, f in tenv.dead() if f[b"reason"] == b"db_rejected")
        assert not warnings_with(logs, REFUSING)
    finally:
        tenv.sql(f"DROP FUNCTION IF EXISTS {t}_picky() CASCADE")


# -- statement timeouts -------------------------------------------------------------------


def test_a_row_slower_than_the_statement_timeout_is_dead_lettered(
    tenv: Env, logs: pytest.LogCaptureFixture
) -> None:
    """A row that takes longer than FILEPIPE_STATEMENT_TIMEOUT_MS to insert (here a trigger
    that sleeps on it) is split off like a refused value and, timing out alone again, is
    dead-lettered with the timeout named; the batch is not retried forever."""
    t = tenv.settings.table
    settings = tenv.settings_with(statement_timeout_ms=300)
    try:
        tenv.sql(
            f"CREATE FUNCTION {t}_slow() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$BEGIN IF NEW.filename = 'slow' THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END$$;"
            f"CREATE TRIGGER {t}_slow BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_slow()"
        )
        w = seed(tenv.redis, settings, tenv.storage, 250)
        slow = tenv.xadd({"file_id": str(uuid.uuid4()), "filename": "slow", "key": "data/0001.txt"})
        w.poison[slow] = "db_rejected"
        w.ids.append(slow)
        stats = Draining(settings).finish(90)
        assert stats.inserted == 250 and stats.dead_lettered == 1
        assert_exact(tenv, w)
        ((_, fields),) = tenv.dead()
        assert b"statement timeout" in fields[b"error"]
        assert b"FILEPIPE_STATEMENT_TIMEOUT_MS=300" in fields[b"error"]
        assert not warnings_with(logs, REFUSING)
    finally:
        tenv.sql(f"DROP FUNCTION IF EXISTS {t}_slow() CASCADE")


def test_a_table_locked_past_the_statement_timeout_is_waited_out(
    tenv: Env, logs: pytest.LogCaptureFixture
) -> None:
    """Every load times out because the table is locked: that is the table's problem,
    not the rows', so nothing is split down to dead letters."""
    t = tenv.settings.table
    settings = tenv.settings_with(statement_timeout_ms=300)
    first = seed(tenv.redis, settings, tenv.storage, 20)
    Draining(settings).finish(60)
    w = seed(tenv.redis, settings, tenv.storage, 600, poison_every=10)
    with psycopg.connect(tenv.pg_uri) as lock:
        lock.execute(f"LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE")
        c = Draining(settings)
        wait_for("the refusal logged", lambda: bool(warnings_with(logs, REFUSING)), 30)
        time.sleep(2.0)
        assert c.alive() and tenv.redis.xlen(settings.dead_stream) == 0
        lock.rollback()
    c.finish(120)
    assert_exact(tenv, combined(first, w))
    assert [r for r in warnings_with(logs, REFUSING) if "57014" in r.getMessage()]
    assert warnings_with(logs, ACCEPTING)
