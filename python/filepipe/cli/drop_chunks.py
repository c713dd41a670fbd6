"""`filepipe drop-chunks`: TimescaleDB's drop_chunks, for editions without retention policies."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import Settings
from ..observe.text import plural
from .app import app
from .options import POSTGRES, command


@command(app, "drop-chunks", settings=(*POSTGRES, "table"))
def drop_chunks_cmd(
    s: Settings,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Drop the chunks wholly older than this: 90d, 12w.")
    ],
) -> None:
    """Drop a hypertable's chunks older than a retention window (TimescaleDB's drop_chunks): for
    editions without retention policies, run it from cron."""
    from ..db import drop_old_chunks
    from ..timescale import interval_words, parse_interval

    window = parse_interval("--older-than", older_than)
    dropped = drop_old_chunks(s, window)
    if dropped:
        n = len(dropped)
        typer.echo(f"✓ Dropped {n} {plural(n, 'chunk')} of {s.table} older than {interval_words(window)}")
    else:
        typer.echo(f"✓ No chunk of {s.table} is older than {interval_words(window)}")
