"""`filepipe status`: the pipeline at a glance, with a health line and exit code."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..config import Settings
from .app import app
from .options import PIPELINE, POSTGRES, REDIS, command


@command(
    app,
    "status",
    settings=("claim_idle_ms", *REDIS, *POSTGRES, *PIPELINE),
    helps={"claim_idle_ms": "A consumer idle this long with entries pending is silent, in ms"},
)
def status_cmd(
    s: Settings,
    watch_: Annotated[
        bool,
        typer.Option("--watch", "-w", help="Refresh in place until Ctrl+C (with --json: one line each)."),
    ] = False,
    interval: Annotated[
        float,
        typer.Option("--interval", min=0.1, max=3600, help="Seconds between refreshes with --watch."),
    ] = 2.0,
    count: Annotated[
        int | None,
        typer.Option(
            "--count", min=1, help="With --watch, stop after this many refreshes.", show_default=False
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document for scripts.")] = False,
) -> None:
    """Stream, group lag, pending entries, consumers, dead letters and table throughput,
    with a health line; exit 0 when healthy, 1 when degraded or unreachable."""
    from ..status import collect_status, render, watch

    if watch_:
        st = watch(s, interval, count, as_json=as_json, write=typer.echo)
    else:
        st = collect_status(s)
        if as_json:
            typer.echo(json.dumps(st.to_json(), indent=2))
        else:
            typer.echo(render(st))
    raise typer.Exit(st.exit_code)
