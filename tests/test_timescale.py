"""TimescaleDB detected from the catalog: what `init-db` makes of each state of the server."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo
from tests.conftest import Env, both_tables, on_hypertable
from tests.test_cli import cli_env, run
from tests.test_row_identity import PRIMARY_KEY_SQL

from filepipe import db, status, timescale
from filepipe.db import init_db
from filepipe.embedded import PostgresServer
from filepipe.errors import ConfigError, NotPreloadedError
from filepipe.observe import table as observe_table
from filepipe.timescale import Extension, table_kind

ABSENT = Extension()
AVAILABLE = Extension(available="2.28.3", preloaded=True, preload_libraries="timescaledb")
INSTALLED = Extension(available="2.28.3", installed="2.28.3", preloaded=True, preload_libraries="timescaledb")
NOT_PRELOADED = Extension(available="2.28.3", preload_libraries="")


def test_a_server_without_timescaledb_gets_a_plain_table() -> None:
    assert ABSENT.state == "absent" and not ABSENT.usable
    assert table_kind(ABSENT, plain=False) == timescale.PLAIN
    assert table_kind(ABSENT, plain=True) == timescale.PLAIN


def test_a_server_that_preloads_it_gets_a_hypertable_unless_plain_is_asked() -> None:
    for ext in (AVAILABLE, INSTALLED):
        assert ext.usable
        assert table_kind(ext, plain=False) == timescale.HYPERTABLE
        assert table_kind(ext, plain=True) == timescale.PLAIN
    assert (AVAILABLE.state, INSTALLED.state) == ("available", "installed")
    # Read by a role that may not see shared_preload_libraries: the loader's own setting tells.
    assert table_kind(Extension(available="2.28.3", preloaded=True), plain=False) == timescale.HYPERTABLE


def test_installed_but_not_preloaded_is_refused_with_what_to_change() -> None:
    assert NOT_PRELOADED.state == "not preloaded" and not NOT_PRELOADED.usable
    with pytest.raises(NotPreloadedError) as raised:
        table_kind(NOT_PRELOADED, plain=False)
    assert isinstance(raised.value, ConfigError)  # exit 2, one line
    assert str(raised.value) == (
        "TimescaleDB 2.28.3 is installed on this server but not preloaded: set shared_preload_libraries = "
        "'timescaledb' in postgresql.conf (it is empty now) and restart PostgreSQL (a reload is not enough); "
        "or run `filepipe init-db --plain` to create a plain table instead"
    )
    assert table_kind(NOT_PRELOADED, plain=True) == timescale.PLAIN


def test_the_advice_keeps_the_libraries_already_preloaded() -> None:
    others = Extension(available="2.28.3", preload_libraries="pg_stat_statements")
    assert "(it is now 'pg_stat_statements': keep those libraries and add timescaledb)" in (
        others.preload_advice()
    )
    hidden = Extension(available="2.28.3", preload_libraries=None)  # a role that may not read it
    assert hidden.preload_advice() == (
        "set shared_preload_libraries = 'timescaledb' in postgresql.conf and restart PostgreSQL "
        "(a reload is not enough)"
    )


def test_a_database_that_has_the_extension_but_no_loader_is_refused_even_for_a_plain_table() -> None:
    """Every statement touching TimescaleDB's objects would end the session there."""
    broken = Extension(available="2.28.3", installed="2.27.0", preload_libraries="")
    for plain in (False, True):
        with pytest.raises(NotPreloadedError, match=r"^TimescaleDB 2\.27\.0 is created in this database but"):
            table_kind(broken, plain=plain)


def test_the_facts_are_read_from_the_server(pg_uri: str) -> None:
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        ext = timescale.read_extension(conn)
        available = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()
    assert ext.available == (available[0] if available else "")
    assert ext.preload_libraries == (preload[0] if preload else None)
    assert ext.preloaded == ("timescaledb" in (ext.preload_libraries or ""))


# -- on real servers --------------------------------------------------------------------------


def dimension(env: Env) -> tuple[str, timedelta] | None:
    """The hypertable's time dimension and interval; None for a plain table."""
    if not env.hypertable:
        return None
    rows = env.sql(
        "SELECT column_name, time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_name = %s",
        (env.settings.table,),
    )
    return (rows[0][0], rows[0][1]) if rows else None


def chunk_count(env: Env) -> int:
    query = "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s"
    rows = env.sql(query, (env.settings.table,))
    return int(rows[0][0])


def add_timed_events(env: Env, times_ms: list[int]) -> list[str]:
    """One event per time (entry ids `<ms>-0`, in order), each for the file `a.txt`."""
    env.write_file("a.txt", b"hello")
    pipe = env.redis.pipeline(transaction=False)
    ids = []
    for n, ms in enumerate(sorted(times_ms)):
        entry_id = f"{ms}-{n}"
        pipe.xadd(
            env.settings.stream,
            {"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"},
            id=entry_id,
        )
        ids.append(entry_id)
    pipe.execute()
    return ids


def test_a_server_with_timescaledb_installed_but_not_preloaded(env: Env, tmp_path: Path) -> None:
    """The state after a plain package install (and of this machine's shared server once
    TimescaleDB is built): init-db says what to change and changes nothing; --plain works."""
    with PostgresServer() as server:
        e = cli_env(env, PG_URI=server.uri)
        refused = run(["init-db"], e, tmp_path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.splitlines() == [
            f"error: TimescaleDB {timescale_version()} is installed on this server but not preloaded: set "
            "shared_preload_libraries = 'timescaledb' in postgresql.conf (it is empty now) and restart "
            "PostgreSQL (a reload is not enough); or run `filepipe init-db --plain` to create a plain table "
            "instead"
        ]
        with psycopg.connect(server.uri) as conn:
            assert conn.execute("SELECT to_regclass(%s)", (env.settings.table,)).fetchone() == (None,)
        plain = run(["init-db", "--plain"], e, tmp_path)
        assert plain.returncode == 0, plain.stderr
        ready = f"✓ Table {env.settings.table} ready: plain table on {server.uri}"
        assert plain.stdout.splitlines() == [ready]
        # status reports the state and what to change
        shown = run(["status"], e, tmp_path)
        advice = (
            f"{timescale_version()} installed but not preloaded: set shared_preload_libraries = "
            "'timescaledb' in postgresql.conf (it is empty now) and restart PostgreSQL "
            "(a reload is not enough)"
        )
        assert "  Kind:                   plain table\n" in shown.stdout
        assert f"  TimescaleDB:            {advice}\n" in shown.stdout
        again = run(["init-db", "--plain", "--retention", "30d"], e, tmp_path)
        assert again.returncode == 2
        assert again.stderr.strip() == (
            "error: --retention needs a TimescaleDB hypertable, and --plain asks for a plain table: "
            "nothing was changed"
        )


def timescale_version() -> str:
    from filepipe.embedded import _find_pg_bindir

    bindir = _find_pg_bindir()
    assert bindir is not None
    share = subprocess.run(
        [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    control = (Path(share) / "extension" / "timescaledb.control").read_text()
    return re.search(r"default_version\s*=\s*'([^']+)'", control).group(1)  # type: ignore[union-attr]


@both_tables
def test_init_db_twice_is_idempotent(env: Env, tmp_path: Path) -> None:
    """A hypertable on event_time, chunks of a day, keyed by (stream, stream_id, event_time)."""
    e = cli_env(env)
    table = env.settings.table
    kind = "TimescaleDB hypertable (apache edition, chunks of 1 day)" if env.hypertable else "plain table"
    first = run(env.init_args(), e, tmp_path)
    second = run(env.init_args(), e, tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout == f"✓ Table {table} ready: {kind} on {env.pg_uri}\n"
    assert dimension(env) == (("event_time", timedelta(days=1)) if env.hypertable else None)
    assert [name for (name,) in env.sql(PRIMARY_KEY_SQL, (table,))] == ["stream", "stream_id", "event_time"]


@on_hypertable
def test_the_chunk_interval_is_chosen_and_changed_on_purpose(env: Env, tmp_path: Path) -> None:
    e = cli_env(env)
    env.sql(f"DROP TABLE {env.settings.table}")
    made = run(["init-db", "--chunk-interval", "6h"], e, tmp_path)
    assert made.returncode == 0, made.stderr
    assert "(apache edition, chunks of 6 hours)" in made.stdout
    assert dimension(env) == ("event_time", timedelta(hours=6))
    changed = run(["init-db", "--chunk-interval", "2d"], e, tmp_path)
    assert changed.stdout.splitlines()[1:] == [
        "  chunk interval: new chunks span 2 days (existing chunks keep theirs)"
    ]
    assert "chunks of 2 days" in run(["init-db"], e, tmp_path).stdout  # kept when not given
    bad = run(["init-db", "--chunk-interval", "soon"], e, tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --chunk-interval must be a duration such as 6h, 1d, 90d or 2w (m, h, d, w), not 'soon'"
    )


@on_hypertable
def test_a_plain_table_with_rows_becomes_a_hypertable_only_when_asked(env: Env, tmp_path: Path) -> None:
    e = cli_env(env)
    table = env.settings.table
    env.sql(f"DROP TABLE {table}")
    assert run(["init-db", "--plain"], e, tmp_path).returncode == 0
    day = 86_400_000
    now = int(time.time() * 1000)
    ids = add_timed_events(env, [now - d * day - k for d in range(4) for k in range(250)])  # 4 days
    assert env.drain(stream_retention="all").inserted == 1000

    kept = run(["init-db"], e, tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == [
        f"✓ Table {table} ready: plain table on {env.pg_uri}",
        f"! table {table} is a plain table with rows, left as it is: `filepipe init-db "
        "--migrate-to-hypertable` turns it into a hypertable (it copies every row into chunks, with the "
        "table locked meanwhile)",
    ]
    assert dimension(env) is None

    migrated = run(["init-db", "--migrate-to-hypertable"], e, tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.splitlines() == [
        f"✓ Table {table} turned into a hypertable: 1,000 rows moved into chunks",
        f"✓ Table {table} ready: TimescaleDB hypertable (apache edition, chunks of 1 day) on {env.pg_uri}",
    ]
    assert dimension(env) == ("event_time", timedelta(days=1))
    assert chunk_count(env) >= 4
    assert sorted(r[0] for r in env.sql(f"SELECT stream_id FROM {table}")) == sorted(ids)
    assert env.sql(f"SELECT count(*) FROM ONLY {table}") == [(0,)]  # every row is in a chunk

    # A full replay into the migrated table duplicates nothing.
    env.redis.xgroup_setid(env.settings.stream, env.settings.group, "0")
    again = env.drain(consumer_name="replayer")
    assert again.inserted == 0 and again.duplicates == 1000 and env.rows() == 1000
    assert (
        run(["init-db", "--migrate-to-hypertable"], e, tmp_path)
        .stdout.splitlines()[0]
        .startswith(f"✓ Table {table} ready: TimescaleDB hypertable")
    )  # nothing left to migrate


@on_hypertable
def test_retention_on_the_apache_edition_is_drop_chunks_from_cron(env: Env, tmp_path: Path) -> None:
    """No retention policy in this edition: init-db says so and gives the cron line, and
    `filepipe drop-chunks` drops exactly the chunks wholly older than the window."""
    e = cli_env(env)
    table = env.settings.table
    noted = run(["init-db", "--retention", "5d"], e, tmp_path)
    assert noted.returncode == 0, noted.stderr
    assert noted.stdout.splitlines()[1:] == [
        "! retention: the apache edition of TimescaleDB has no retention policies; drop chunks older than "
        f"5 days from cron instead, e.g. `17 * * * * filepipe drop-chunks --older-than 5d --table {table}`"
    ]
    day = 86_400_000
    now = int(time.time() * 1000)
    times = [now - d * day - k * 1000 for d in range(10) for k in range(30)]
    add_timed_events(env, times)
    assert env.drain().inserted == 300
    before = chunk_count(env)

    dropped = run(["drop-chunks", "--older-than", "5d"], e, tmp_path)
    assert dropped.returncode == 0, dropped.stderr
    ((left, oldest, cutoff),) = env.sql(
        "SELECT count(*), min(range_start), now() - interval '5 days' FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s",
        (table,),
    )
    gone = before - left
    assert gone >= 4 and dropped.stdout == f"✓ Dropped {gone} chunks of {table} older than 5 days\n"
    assert oldest <= cutoff < oldest + timedelta(days=1)  # the chunk holding the cutoff stays
    kept = [t for t in times if t >= oldest.timestamp() * 1000]
    assert env.rows() == len(kept) and len(kept) < 300
    again = run(["drop-chunks", "--older-than", "5d"], e, tmp_path)
    assert again.stdout == f"✓ No chunk of {table} is older than 5 days\n"


def test_drop_chunks_refuses_a_plain_table(env: Env, tmp_path: Path) -> None:
    result = run(["drop-chunks", "--older-than", "90d"], cli_env(env), tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: table {env.settings.table} is a plain table: it has no chunks to drop (a hypertable has; "
        "see `filepipe init-db --migrate-to-hypertable`)"
    )


@on_hypertable
def test_compression_needs_the_timescale_license_and_nothing_is_changed(env: Env, tmp_path: Path) -> None:
    e = cli_env(env)
    env.sql(f"DROP TABLE {env.settings.table}")
    refused = run(["init-db", "--compress-after", "7d", "--retention", "90d"], e, tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (
        "error: --compress-after needs TimescaleDB's compression, which the apache edition of TimescaleDB "
        "on this server does not have (it is in the Timescale-License edition): nothing was changed"
    )
    assert env.sql("SELECT to_regclass(%s)", (env.settings.table,)) == [(None,)]  # one transaction


@on_hypertable
def test_the_timescale_license_statements_are_known_to_this_timescaledb(env: Env) -> None:
    """The policies, compression settings and continuous aggregate run only on the full edition
    (checked elsewhere). Here each statement must get as far as the license check: its
    functions, argument names and options exist in this version's catalog."""
    table = env.settings.table
    statements = [
        *timescale.retention_sql(),
        *timescale.compression_sql(table, enabled=False),
        *timescale.rate_view_sql(table),
    ]
    for statement in statements:
        with psycopg.connect(env.pg_uri, autocommit=True) as conn:
            if "add_continuous_aggregate_policy" in statement.as_string(conn):
                conn.execute(f"CREATE VIEW {timescale.rate_view_name(table)} AS SELECT 1")  # a regclass
            with pytest.raises(psycopg.errors.FeatureNotSupported, match='the current "apache" license'):
                conn.execute(statement, {"t": table, "after": timedelta(days=7)})
    with psycopg.connect(env.pg_uri, autocommit=True) as conn:  # what a mistake would get instead
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute(
                "SELECT add_retention_policy(%s::regclass, dropafter => '1 day'::interval)", (table,)
            )
        conn.execute(f"DROP VIEW {timescale.rate_view_name(table)}")


# TimescaleDB's full edition loads a row into a compressed chunk of a table with a unique key
# by decompressing the batches that could hold its key, and refuses (tsl/src/compression/
# compression_dml.c): a statement past its cap on decompressed tuples, and every such row where
# DML decompression is turned off (`timescaledb.enable_dml_decompression = off`, for a role, a
# database or the server). This edition has no compression, so a trigger stands in for it: it
# refuses every row with TimescaleDB's SQLSTATE and message unless the setting is as filepipe's
# merge sets it, and counts its refusals in a sequence (nextval outlives the rollback).
REFUSAL_TRIGGER = """
CREATE SEQUENCE {table}_refusals;
CREATE FUNCTION {table}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF {refused} THEN
    PERFORM nextval('{table}_refusals');
    RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_refuse();
"""
CAP, NO_DML = "decompression cap", "DML decompression off"
REFUSALS = {  # (when, message, SQLSTATE, what the merge logs when it is refused)
    CAP: (
        "current_setting('timescaledb.max_tuples_decompressed_per_dml_transaction') <> '0'",
        "tuple decompression limit exceeded by operation",
        "53400",
        "the merge met TimescaleDB's decompression cap, merging without it",
    ),
    NO_DML: (
        "NOT current_setting('timescaledb.enable_dml_decompression')::bool",
        "inserting into compressed chunk with unique constraints disabled",
        "0A000",
        "the merge was refused for compressed chunks, merging with DML decompression on",
    ),
}


@contextlib.contextmanager
def database_with(env: Env, *settings: str) -> Iterator[str]:
    """A database of its own on the hypertable server whose sessions start with `settings`
    (`name = value`); yields its URI, and drops it afterwards."""
    name = f"fp_db_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(env.pg_uri, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
        for setting in settings:
            conn.execute(f"ALTER DATABASE {name} SET {setting}")
    try:
        yield conninfo.make_conninfo(env.pg_uri, dbname=name)
    finally:
        with psycopg.connect(env.pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def refusing(env: Env, refusal: str) -> Iterator[Env]:
    """The test's hypertable refusing rows as a compressed chunk would (`REFUSALS`); with DML
    decompression off, in a database of its own whose sessions start with it off."""
    with contextlib.ExitStack() as stack:
        local = env
        if refusal == NO_DML:
            uri = stack.enter_context(database_with(env, "timescaledb.enable_dml_decompression = off"))
            local = Env(env.settings_with(pg_uri=uri), env.redis, uri, env.storage, hypertable=True)
            assert init_db(local.settings).hypertable
        table = local.settings.table
        when, message, sqlstate, _ = REFUSALS[refusal]
        local.sql(REFUSAL_TRIGGER.format(table=table, refused=when, message=message, sqlstate=sqlstate))
        try:
            yield local
        finally:
            local.sql(f"DROP FUNCTION {table}_refuse() CASCADE; DROP SEQUENCE {table}_refusals")


def refusals(env: Env) -> int:
    """How many statements the stand-in trigger refused."""
    ((last, called),) = env.sql(f"SELECT last_value, is_called FROM {env.settings.table}_refusals")
    return int(last) if called else 0


@pytest.mark.parametrize("refusal", [CAP, NO_DML])
@on_hypertable
def test_rows_refused_for_compressed_chunks_are_merged_with_the_limits_lifted(
    env: Env, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A first delivery's direct COPY refused goes to the merge, which lifts the cap and turns
    DML decompression on for its own transaction; the batches after it merge that way from
    the start. A full replay, the same."""
    caplog.set_level(logging.INFO, logger="filepipe.db")
    with refusing(env, refusal) as local:
        ids = add_timed_events(local, [int(time.time() * 1000) - 60_000 + i for i in range(500)])
        first = local.drain(batch_size=100, stream_retention="all")
        assert first.inserted == 500 and first.dead_lettered == 0 and local.pending() == 0
        message = REFUSALS[refusal][1]
        assert f"direct COPY into compressed chunks refused, merging instead: {message}" in caplog.text
        # Only the first batch was refused (one per loading connection at most: the batches in
        # flight then), not each of the five.
        in_flight, batches = local.settings.pool_size, 500 // 100
        assert in_flight < batches, "more loading connections than batches: nothing to tell apart"
        refused = refusals(local)
        assert 1 <= refused <= in_flight
        # Each refusal the table counted is one the loader saw and turned into a merge.
        assert caplog.text.count("direct COPY into compressed chunks refused, merging instead") == refused
        local.redis.xgroup_setid(local.settings.stream, local.settings.group, "0")
        replay = local.drain(batch_size=100, consumer_name="replayer")
        assert replay.inserted == 0 and replay.duplicates == 500 and replay.dead_lettered == 0
        assert 2 <= refusals(local) <= 2 * in_flight
        assert sorted(r[0] for r in local.sql(f"SELECT stream_id FROM {local.settings.table}")) == sorted(ids)
        assert local.dead() == []
        setting, value = {
            CAP: ("timescaledb.max_tuples_decompressed_per_dml_transaction", "100000"),
            NO_DML: ("timescaledb.enable_dml_decompression", "off"),
        }[refusal]
        assert local.sql(f"SHOW {setting}") == [(value,)]  # as before, for the other sessions


@pytest.mark.parametrize("refusal", [CAP, NO_DML])
@on_hypertable
def test_a_merge_refused_for_compressed_chunks_is_retried_and_the_next_ones_are_not_refused(
    env: Env, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redeliveries merge from the start (no direct COPY first): the first merge refused is
    retried with TimescaleDB's limits lifted, and so are the batches after it."""
    caplog.set_level(logging.INFO, logger="filepipe.db")
    with refusing(env, refusal) as local, db.create_pool(local.settings) as pool:
        loader = db.Loader(pool, local.settings)
        for _ in range(3):
            time.sleep(0.002)  # the made-up row is keyed by the millisecond
            assert loader.load(loader._made_up_row("c"), 1, direct=False) == 1
        assert refusals(local) == 1 and local.rows() == 3
        assert caplog.text.count(f"{REFUSALS[refusal][3]}: {REFUSALS[refusal][1]}") == 1, caplog.text


HISTORY_FILL = """
INSERT INTO {table} (event_time, stream, stream_id, file_id, filename, storage, storage_key, size_bytes,
                     checksum_sha256, uploaded_at, consumer, processed_at)
SELECT t, 'old', 'h-' || i, gen_random_uuid(), 'f', 'local', 'k', 100, 'x', t, 'c', t
FROM (SELECT i, date_trunc('day', now()) - interval '30 days' * (i::float8 / %(n)s) - interval '1 s' AS t
      FROM generate_series(1, %(n)s) AS i) AS s
"""


@on_hypertable
def test_status_of_a_big_hypertable_reads_the_catalog_not_old_chunks(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row totals from each chunk's statistics (the one being written, never analyzed, by its
    size), the last minute and hour from the newest chunks only: an old chunk locked away
    from every reader does not hold status up."""
    table = env.settings.table
    env.sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    env.sql(HISTORY_FILL.format(table=table), {"n": 30_000})  # 30 days before today
    env.sql(f"ANALYZE {table}")
    env.sql(
        f"""INSERT INTO {table} (event_time, stream, stream_id, file_id, filename, storage, storage_key,
            size_bytes, checksum_sha256, uploaded_at, consumer)
        SELECT now() - g * interval '1 ms', 'new', 'n-' || g, gen_random_uuid(), 'f', 'local', 'k', 100, 'x',
               now(), 'c' FROM generate_series(1, 30000) g"""
    )
    ((newest, reltuples),) = env.sql(
        "SELECT c.oid::regclass::text, c.reltuples FROM pg_class c WHERE c.oid = (SELECT "
        "format('%%I.%%I', chunk_schema, chunk_name)::regclass FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s ORDER BY range_start DESC LIMIT 1)",
        (table,),
    )
    assert reltuples < 0, f"{newest} was analyzed"  # the estimate must come from its size
    oldest = env.sql(
        "SELECT format('%%I.%%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s ORDER BY range_start LIMIT 1",
        (table,),
    )[0][0]
    monkeypatch.setattr(observe_table, "LARGE_TABLE_ROWS", 10_000)
    monkeypatch.setattr(status, "STATEMENT_TIMEOUT_MS", 3000)
    with psycopg.connect(env.pg_uri) as holder:
        holder.execute(f"LOCK TABLE {oldest} IN ACCESS EXCLUSIVE MODE")  # held until the block ends
        st = status.collect_status(env.settings)
    assert st.pg_error == "", st.pg_error
    e = st.events
    assert e is not None and e.rows_estimated and e.recent_limited_to_day
    # Half the rows are in the chunk never analyzed: counted by its size, not left out.
    assert abs(e.rows_total - 60_000) < 60_000 * 0.15, e.rows_total
    assert (e.rows_last_minute, e.rows_last_hour) == (30_000, 30_000)
    assert sum(m["files"] for m in e.table["history"]["minutes"]) == 30_000
    assert e.table["chunks"] >= 30


@pytest.mark.parametrize("server", ["timescaledb", "not preloaded"])
def test_the_demo_on_a_configured_server(
    server: str, redis_url: str, tsdb_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A hypertable where TimescaleDB can be used; a plain table, said so, where it is
    installed but not preloaded."""
    from filepipe.demo import run_demo

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("REDIS_URL", redis_url)
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        uri = tsdb_uri if server == "timescaledb" else stack.enter_context(PostgresServer()).uri
        monkeypatch.setenv("PG_URI", uri)
        run_demo(30, echo=lines.append, serve=False)
    table = f"filepipe_demo_{os.getpid()}"
    if server == "timescaledb":
        assert f"✓ Table {table} ready (hypertable)" in lines
    else:
        assert f"✓ Table {table} ready (plain table)" in lines
        assert (
            "! TimescaleDB is installed there but not preloaded, so the demo uses a plain table; for a "
            "hypertable, set shared_preload_libraries = 'timescaledb' in postgresql.conf (it is empty now) "
            "and restart PostgreSQL (a reload is not enough)"
        ) in lines
    assert f"✓ 30 rows in {table}; the first five:" in lines and lines[-1] == "✓ Cleaned up"


@on_hypertable
def test_the_rate_history_reads_the_aggregate_where_there_is_one(env: Env) -> None:
    """The continuous aggregate is made only on the Timescale-License edition (checked
    elsewhere); a plain view of its definition stands in for it here, so that the query
    status and the dashboard send it is run, and must agree with the table's."""
    table = env.settings.table
    add_timed_events(env, [int(time.time() * 1000) - 120_000 + 7 * i for i in range(300)])
    assert env.drain().inserted == 300
    with rate_view_stand_in(env), psycopg.connect(env.pg_uri) as conn:
        facts = timescale.read_table(conn, table)
        assert facts.rate_view == ""  # not a continuous aggregate, and not this edition
        from_table = timescale.rate_history(conn, table, facts, 60)
        facts.rate_view = timescale.rate_view_name(table)
        from_view = timescale.rate_history(conn, table, facts, 60)
    assert (from_table[0], from_view[0]) == ("table", "continuous aggregate")
    assert from_view[1] == from_table[1] and sum(m.files for m in from_view[1]) == 300


@contextlib.contextmanager
def rate_view_stand_in(env: Env) -> Iterator[None]:
    """A plain view of the continuous aggregate's definition, under its name (dropped after)."""
    table = env.settings.table
    env.sql(
        f"CREATE VIEW {timescale.rate_view_name(table)} AS SELECT time_bucket(INTERVAL '1 minute', "
        "event_time) AS minute, consumer, count(*) AS files, sum(size_bytes) AS bytes "
        f"FROM {table} GROUP BY 1, 2"
    )
    try:
        yield
    finally:
        env.sql(f"DROP VIEW {timescale.rate_view_name(table)}")


@on_hypertable
def test_the_aggregate_gives_the_last_day_by_the_hour_and_the_table_does_not(env: Env) -> None:
    """Beyond the last hour the history comes from the continuous aggregate only (reading a
    day of the table's rows would cost what the aggregate saves): hour by hour and consumer,
    shown by status and the dashboard as a line of the table's figures. The same stand-in for
    the aggregate as above."""
    table = env.settings.table
    now = int(time.time() * 1000)
    # Every third hour over 30 hours, 20 events each; the current hour 25.
    hours_ago = [h for h in range(0, 30, 3) for _ in range(25 if h == 0 else 20)]
    add_timed_events(env, [now - h * 3_600_000 - 90_000 - k for k, h in enumerate(hours_ago)])
    assert env.drain().inserted == 205
    with psycopg.connect(env.pg_uri) as conn:
        plain = timescale.table_figures(conn, table, history_minutes=60)
    assert plain.history_source == "table" and plain.day_history == []
    assert [line[0] for line in plain.to_json()["lines"]] == ["Kind", "Chunks", "Policies"]
    assert plain.to_json()["history"]["hours"] == []

    with rate_view_stand_in(env), psycopg.connect(env.pg_uri) as conn:
        facts = timescale.read_table(conn, table)
        facts.rate_view = timescale.rate_view_name(table)  # as on the Timescale-License edition
        hours = timescale.rate_history_hours(conn, facts)
        expected = conn.execute(
            f"SELECT date_trunc('hour', event_time), consumer, count(*), sum(size_bytes) FROM {table} "
            "WHERE event_time >= date_trunc('hour', now() - interval '23 hours') GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    assert [(m.minute, m.consumer, m.files, m.bytes) for m in hours] == expected
    assert sum(m.files for m in hours) == 165  # 8 of the 10 hours with events are in the last day
    figures = timescale.TableFigures(facts, 205, "continuous aggregate", [], 60, hours)
    doc = figures.to_json()
    assert doc["lines"][-1] == [
        "Last 24 hours",
        f"165 files, 0.0 MB; busiest hour {hours[-1].minute.astimezone(timezone.utc):%H}:00 UTC with 25 "
        "(from the continuous aggregate)",
        "",
    ]
    assert sum(h["files"] for h in doc["history"]["hours"]) == 165
