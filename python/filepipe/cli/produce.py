"""`filepipe produce`: store files and enqueue one event per file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import Settings
from ..observe.text import plural
from .app import app
from .options import LAYOUT, REDIS, STORAGE, command


@command(app, "produce", settings=(*REDIS, "stream", *STORAGE, *LAYOUT))
def produce(
    s: Settings,
    paths: Annotated[
        list[Path], typer.Argument(help="Files or directories (walked recursively).", show_default=False)
    ],
    link: Annotated[
        bool, typer.Option("--link", help="Hard-link into local storage instead of copying.")
    ] = False,
) -> None:
    """Store files and enqueue one 'file uploaded' event per file."""
    from ..producer import Producer

    producer = Producer(s)
    try:
        n = producer.produce(paths, link=link)
    finally:
        producer.close()
    where = f"{s.stream} ({s.partitions} {plural(s.partitions, 'partition')})" if s.partitions else s.stream
    typer.echo(f"✓ Enqueued {n} {plural(n, 'event')} to {where} ({producer.storage.describe()})")
