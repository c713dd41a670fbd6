"""`filepipe benchmark`: measure the services, name the bottleneck and the fix."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from ..config import Settings
from .app import app
from .options import POSTGRES, REDIS, STORAGE, command


@command(
    app,
    "benchmark",
    settings=("batch_size", *REDIS, *POSTGRES, "stream", "table", *STORAGE),
    helps={"batch_size": "Batch size to model"},
)
def benchmark_cmd(
    s: Settings,
    pipeline: Annotated[
        int,
        typer.Option(
            "--pipeline",
            min=0,
            max=10_000_000,
            metavar="N",
            help="Also run N synthetic events end to end (scratch stream and table).",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document for machines.")] = False,
    samples: Annotated[
        int, typer.Option("--samples", min=3, max=10_000, help="Round trips per latency figure.")
    ] = 20,
    connections: Annotated[
        int, typer.Option("--connections", min=1, max=100, help="New PostgreSQL connections to time.")
    ] = 5,
    file_size: Annotated[
        int | None,
        typer.Option(
            "--file-size",
            min=1,
            help="Typical file size in bytes (default: from recent events, else 64 KiB)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure Redis, PostgreSQL and the storage, and name the bottleneck (the guide's benchmark.py)."""
    from .. import benchmark

    progress = None if as_json or not sys.stderr.isatty() else (lambda msg: typer.echo(msg, err=True))
    # SIGTERM as Ctrl-C: the scratch streams, tables and files are removed before it exits.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = benchmark.run(
            s,
            samples=samples,
            connections=connections,
            file_size=file_size,
            pipeline=pipeline,
            progress=progress,
        )
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    typer.echo(benchmark.render_json(report) if as_json else benchmark.render(report))
    raise typer.Exit(report.exit_code)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
