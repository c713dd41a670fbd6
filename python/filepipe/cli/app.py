"""The Typer app, its error handling and its logging; the commands are in the modules beside it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from .. import __version__
from ..errors import ConfigError, FilepipeError
from ..redaction import SafeFormatter, printable, scrub

app = typer.Typer(
    name="filepipe",
    help="Move 'file uploaded' events from a Redis stream into PostgreSQL/TimescaleDB.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@contextlib.contextmanager
def errors_as_lines(debug: bool) -> Iterator[None]:
    """Turns a FilepipeError into one clear line on stderr and an exit code (2 for
    configuration, 1 otherwise); with `debug`, the traceback instead."""
    try:
        yield
    except FilepipeError as e:
        if debug:
            raise
        typer.echo(f"error: {scrub(printable(str(e)))}", err=True)
        raise typer.Exit(2 if isinstance(e, ConfigError) else 1) from None


def setup_logging(debug: bool) -> None:
    """filepipe's log lines on stderr: escaped and scrubbed, the libraries' own warnings too."""
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger("filepipe")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        # Log lines quote entry fields and client libraries' messages: escaped, scrubbed.
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
        # The libraries' own warnings (psycopg's pool, uvicorn) go through it too.
        for name in ("psycopg", "uvicorn"):
            library = logging.getLogger(name)
            if not library.handlers:
                library.addHandler(handler)
                library.propagate = False


def _version(value: bool) -> None:
    if value:
        from .. import _native

        typer.echo(f"filepipe {__version__} (extension {_native.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Move 'file uploaded' events from a Redis stream into PostgreSQL/TimescaleDB."""


def main() -> None:
    """Entry point of the `filepipe` script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
