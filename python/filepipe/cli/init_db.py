"""`filepipe init-db`: create the events table, or upgrade one of the old layout."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import Settings, mask_url
from ..observe.text import plural
from .app import app
from .options import POSTGRES, command


@command(app, "init-db", settings=(*POSTGRES, "table", "stream"))
def init_db_cmd(
    s: Settings,
    plain: Annotated[
        bool,
        typer.Option("--plain", help="Create a plain PostgreSQL table even where TimescaleDB is installed."),
    ] = False,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate-to-hypertable",
            help="Turn an existing plain table with rows into a hypertable (copies every row, table locked).",
        ),
    ] = False,
    chunk_interval: Annotated[
        str | None,
        typer.Option(
            "--chunk-interval",
            help="Time each new chunk of the hypertable spans: 6h, 1d, 1w (default 1d for a new hypertable).",
            show_default=False,
        ),
    ] = None,
    retention: Annotated[
        str | None,
        typer.Option(
            "--retention",
            help="Drop chunks older than this (90d): TimescaleDB's policy where the edition has it.",
            show_default=False,
        ),
    ] = None,
    compress_after: Annotated[
        str | None,
        typer.Option(
            "--compress-after",
            help="Compress chunks older than this (7d): needs TimescaleDB's Timescale-License edition.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Create the events table (a hypertable where TimescaleDB can be used), or upgrade one of
    the old layout (its rows are given the stream name). Idempotent."""
    from ..db import init_db
    from ..timescale import parse_interval

    info = init_db(
        s,
        plain=plain,
        migrate=migrate,
        chunk_interval=parse_interval("--chunk-interval", chunk_interval) if chunk_interval else None,
        retention=parse_interval("--retention", retention) if retention else None,
        compress_after=parse_interval("--compress-after", compress_after) if compress_after else None,
    )
    if info.upgraded is not None:
        up = info.upgraded
        about = f" (about {up.rows:,})" if up.rows else ""
        typer.echo(
            f"✓ Table {info.table} upgraded in {up.seconds:.1f} s: rows keyed by "
            f"(stream, stream_id, event_time); existing rows{about} are stream '{up.stream}'"
        )
    if info.migrated_rows is not None:
        n = info.migrated_rows
        moved = f"{n:,} {plural(n, 'row')} moved into chunks"
        typer.echo(f"✓ Table {info.table} turned into a hypertable: {moved}")
    typer.echo(f"✓ Table {info.table} ready: {info.describe()} on {mask_url(s.pg_uri)}")
    for note in info.notes:
        typer.echo(note)
