"""What `init-db` sets up on a hypertable: its chunks, compression, TimescaleDB's retention
policy and the rate history's continuous aggregate; and `drop-chunks`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

# One chunk per day. TimescaleDB's advice is that the chunks being written (with their
# indexes) fit in about a quarter of the server's memory; a file event row takes about
# 430 bytes with its indexes, so a day at 100 files/s (8.6 M rows) is about 3.7 GB, right
# for a server with 16 GB. Queries of the last minutes and hours (status, the dashboard)
# touch one or two chunks; retention drops whole days. Much busier tables want hours
# (`--chunk-interval 6h`), much quieter ones a week.
DEFAULT_CHUNK_INTERVAL = timedelta(days=1)
# Compressed chunks keep each stream's rows together, in time order: a redelivered or
# backfilled row then decompresses only the batches whose time range holds it.
COMPRESS_SEGMENT_BY = "stream"
COMPRESS_ORDER_BY = "event_time DESC, stream_id"
# INSERT … ON CONFLICT DO NOTHING into compressed chunks (redeliveries, backfills).
MIN_COMPRESSED_LOAD_VERSION = (2, 11)
# Beyond the last minutes, the history the aggregate gives: the last day, hour by hour (a day
# of the table's own rows would cost what the aggregate saves, so without one there is none).
DAY_HISTORY_HOURS = 24
# The rate history's continuous aggregate (`<table>_per_minute`), refreshed every minute over
# the whole day it shows and an hour more: a late event (a redelivery, a backfill) within it is
# counted at the next refresh. After the first, a refresh recomputes only the buckets that
# changed, so the wide window costs little.
RATE_VIEW_SUFFIX = "_per_minute"
RATE_REFRESH_START = timedelta(hours=DAY_HISTORY_HOURS + 1)
RATE_REFRESH_END = timedelta(minutes=1)
RATE_REFRESH_EVERY = timedelta(minutes=1)


def rate_view_name(table: str) -> str:
    """The rate history's continuous aggregate beside `table` (same schema)."""
    return table + RATE_VIEW_SUFFIX


def ident(name: str) -> sql.Identifier:
    """`schema.name` or `name` as a quoted identifier."""
    return sql.Identifier(*name.split("."))


def create_hypertable_sql(*, migrate: bool) -> sql.SQL:
    """The call that turns the events table into a hypertable (the long form, known to
    every TimescaleDB 2.x)."""
    return sql.SQL(
        "SELECT create_hypertable(%(t)s::regclass, 'event_time', chunk_time_interval => %(i)s::interval, "
        "if_not_exists => TRUE, migrate_data => " + ("TRUE" if migrate else "FALSE") + ")"
    )


def retention_sql() -> list[sql.SQL]:
    """TimescaleDB's retention policy, replacing one already there (Timescale License)."""
    return [
        sql.SQL("SELECT remove_retention_policy(%(t)s::regclass, if_exists => TRUE)"),
        sql.SQL("SELECT add_retention_policy(%(t)s::regclass, drop_after => %(after)s::interval)"),
    ]


def compression_sql(table: str, *, enabled: bool) -> list[sql.SQL | sql.Composed]:
    """Compression (segmented by stream, ordered by time) and its policy, replacing a policy
    already there; the settings of a hypertable that compresses already are left as they
    are (TimescaleDB refuses to change them while chunks are compressed). Timescale License."""
    out: list[sql.SQL | sql.Composed] = []
    if not enabled:
        out.append(
            sql.SQL(
                "ALTER TABLE {t} SET (timescaledb.compress, timescaledb.compress_segmentby = {seg}, "
                "timescaledb.compress_orderby = {order})"
            ).format(
                t=ident(table), seg=sql.Literal(COMPRESS_SEGMENT_BY), order=sql.Literal(COMPRESS_ORDER_BY)
            )
        )
    out += [
        sql.SQL("SELECT remove_compression_policy(%(t)s::regclass, if_exists => TRUE)"),
        sql.SQL("SELECT add_compression_policy(%(t)s::regclass, compress_after => %(after)s::interval)"),
    ]
    return out


def rate_view_sql(table: str) -> list[sql.Composed]:
    """The continuous aggregate of files and bytes per minute and consumer (by event time: a
    continuous aggregate buckets on the hypertable's time column), answering with the rows
    not yet materialized too, and its refresh policy. Timescale License."""
    view = ident(rate_view_name(table))
    return [
        sql.SQL(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {view} "
            "WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS "
            "SELECT time_bucket(INTERVAL '1 minute', event_time) AS minute, consumer, "
            "count(*) AS files, sum(size_bytes) AS bytes FROM {table} GROUP BY 1, 2 WITH NO DATA"
        ).format(view=view, table=ident(table)),
        sql.SQL(
            "SELECT add_continuous_aggregate_policy({view_name}::regclass, "
            "start_offset => {start}::interval, end_offset => {end}::interval, "
            "schedule_interval => {every}::interval, if_not_exists => TRUE)"
        ).format(
            view_name=sql.Literal(rate_view_name(table)),
            start=sql.Literal(RATE_REFRESH_START),
            end=sql.Literal(RATE_REFRESH_END),
            every=sql.Literal(RATE_REFRESH_EVERY),
        ),
    ]


def drop_chunks(conn: psycopg.Connection[Any], table: str, older_than: timedelta) -> list[str]:
    """Drops the chunks whose whole range is older than `older_than` (TimescaleDB's
    `drop_chunks`, in every edition); returns the chunks dropped."""
    rows = conn.execute(
        "SELECT drop_chunks(%s::regclass, older_than => %s::interval)", (table, older_than)
    ).fetchall()
    return [str(r[0]) for r in rows]
