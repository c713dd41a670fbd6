"""The `filepipe` command line: the Typer app (`app.py`), how commands declare their options
(`options.py`), and one module per command. A command module imports only Typer and the
configuration; the domain module it runs is imported when the command runs, so every
command starts without paying for the others."""

from . import (  # noqa: F401 (each module adds its command to the app)
    benchmark,
    consume,
    dashboard,
    demo,
    dlq,
    drop_chunks,
    init_db,
    produce,
    show_config,
    status,
)
from .app import app, errors_as_lines, main, setup_logging

__all__ = ["app", "errors_as_lines", "main", "setup_logging"]
