"""The Typer app, its error handling and its logging; the commands are in the modules beside it."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Annotated, Any

import typer

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
        message = scrub(printable(str(e)))
        if _format == "json":
            doc = {
                **line_document("ERROR", f"error: {message}"),
                "consumer": _who.consumer,
                "worker": _who.worker,
            }
            typer.echo(json.dumps(doc, ensure_ascii=False), err=True)
        else:
            typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2 if isinstance(e, ConfigError) else 1) from None


class _Who(logging.Filter):
    """Names the process on each of its log lines: the consumer, and the worker of
    `consume --processes` (None outside one)."""

    consumer: str | None = None
    worker: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.consumer = self.consumer
        record.worker = self.worker
        return True


class TextFormatter(SafeFormatter):
    """`12:00:01 INFO worker-1 [worker 1]: message`: time, level, who, the message escaped
    and scrubbed (the name only where one is set)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(who)s%(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        consumer, worker = getattr(record, "consumer", None), getattr(record, "worker", None)
        where = f" [{_worker_label(worker)}]" if worker is not None else ""
        record.who = f"{consumer}{where}: " if consumer else ""
        return super().formatMessage(record)


class JsonFormatter(SafeFormatter):
    """One JSON object a line: time (ISO 8601, UTC), level, consumer, worker, message, and
    the traceback where there is one, scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        doc = line_document(record.levelname, scrub(record.getMessage()), record.created)
        doc["consumer"] = getattr(record, "consumer", None)
        doc["worker"] = getattr(record, "worker", None)
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def line_document(level: str, message: str, created: float | None = None) -> dict[str, Any]:
    """The fields every JSON line has."""
    when = datetime.fromtimestamp(time.time() if created is None else created, timezone.utc)
    return {"time": when.isoformat(timespec="milliseconds"), "level": level, "message": message}


def _worker_label(worker: str) -> str:
    return f"worker {worker}" if worker.isdigit() else worker


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is logged, not to the stream it was
    at set-up (as logging's own last-resort handler does): a thread that logs after
    `sys.stderr` was replaced and the old one closed (an embedding application's
    redirection, a test's capture) still reaches it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_who = _Who()
_handler: logging.Handler | None = None
_format = "text"


def setup_logging(debug: bool, log_format: str = "text") -> None:
    """filepipe's log lines on stderr, as text or JSON: escaped and scrubbed, the libraries'
    own warnings (psycopg's pool, uvicorn) too."""
    global _handler, _format
    _format = log_format
    root = logging.getLogger("filepipe")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if _handler is None:
        _handler = _StderrHandler()
        _handler.addFilter(_who)
        root.addHandler(_handler)
        root.propagate = False
        for name in ("psycopg", "uvicorn"):
            library = logging.getLogger(name)
            if not library.handlers:
                library.addHandler(_handler)
                library.propagate = False
    _handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())


def log_as(consumer: str | None, worker: str | None = None) -> None:
    """Every log line from now on names `consumer` and `worker`: the index of a worker of
    `consume --processes` ("0", "1", …) or "supervisor"."""
    _who.consumer, _who.worker = consumer, worker


def line_writer(log_format: str) -> Callable[[str], None]:
    """How a command's progress lines reach stdout: as they are, prefixed with the worker
    under `consume --processes`, or as JSON objects like the log lines."""
    if log_format == "json":

        def write_json(line: str) -> None:
            doc = line_document("INFO", line)
            doc["consumer"], doc["worker"] = _who.consumer, _who.worker
            typer.echo(json.dumps(doc, ensure_ascii=False))

        return write_json
    if _who.worker is not None:
        prefix = f"{_who.consumer} [{_worker_label(_who.worker)}]: "
        return lambda line: typer.echo(prefix + line)
    return typer.echo


def _version(value: bool) -> None:
    if value:
        from .. import __version__, _native  # (importlib.metadata: only when asked)

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
    command_line(sys.argv[1:2])()


def command_line(first: list[str]) -> typer.Typer:
    """The app that runs a command line starting with `first`: when it names a command,
    the app with only that command (Typer builds the parser of every command it has
    before it runs one, a few milliseconds each; the others' help and errors are not
    needed to run this one); otherwise the whole app."""
    picked = [c for c in app.registered_commands if first and c.name == first[0]]
    if not picked:
        return app
    one = copy.copy(app)
    one.registered_commands = picked
    one.registered_groups = []
    return one
