"""`filepipe demo`: the whole pipeline once, on sample files."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app
from .options import command


@command(app, "demo")
def demo(
    files: Annotated[
        int,
        typer.Option(
            "--files",
            min=1,
            max=1_000_000,
            help="Events for filepipe to drain (the guide's fast consumer gets a tenth, the old a 500th).",
        ),
    ] = 50_000,
) -> None:
    """Run the whole pipeline once on sample files beside the guide's two consumers, with
    throwaway Redis and PostgreSQL unless REDIS_URL / PG_URI are set; on a terminal, then
    serve the dashboard until Enter."""
    from ..demo import run_demo

    run_demo(files, echo=typer.echo)
