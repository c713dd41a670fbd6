"""The `filepipe` command line."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .config import Settings, load_settings, mask_url
from .constants import DEFAULT_BATCH_SIZE
from .errors import ConfigError, FilepipeError
from .redaction import SafeFormatter, error_line, printable, scrub

app = typer.Typer(
    name="filepipe",
    help="Move 'file uploaded' events from a Redis stream into PostgreSQL/TimescaleDB.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])

# -- options shared by commands (each also an environment variable; see `config.ENV_NAMES`) --
RedisUrl = Annotated[
    str | None, typer.Option("--redis-url", help="Redis URL (env: REDIS_URL)", show_default=False)
]
PgUri = Annotated[
    str | None,
    typer.Option("--pg-uri", help="PostgreSQL URI (env: PG_URI, DATABASE_URL)", show_default=False),
]
Stream = Annotated[
    str | None,
    typer.Option("--stream", help="Stream name (env: STREAM_NAME; default file_uploads)", show_default=False),
]
Group = Annotated[
    str | None,
    typer.Option(
        "--group", help="Consumer group (env: CONSUMER_GROUP; default file_processors)", show_default=False
    ),
]
Table = Annotated[
    str | None,
    typer.Option(
        "--table", help="Events table (env: FILEPIPE_TABLE; default file_events)", show_default=False
    ),
]
StorageMode = Annotated[
    str | None, typer.Option("--storage-mode", help="local or s3 (env: STORAGE_MODE)", show_default=False)
]
LocalDir = Annotated[
    str | None,
    typer.Option(
        "--local-storage-dir", help="Local storage root (env: LOCAL_STORAGE_DIR)", show_default=False
    ),
]
S3Bucket = Annotated[
    str | None, typer.Option("--s3-bucket", help="S3 bucket (env: S3_BUCKET)", show_default=False)
]
S3Prefix = Annotated[
    str | None, typer.Option("--s3-prefix", help="S3 key prefix (env: S3_PREFIX)", show_default=False)
]
S3Endpoint = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint-url", help="S3-compatible endpoint (env: S3_ENDPOINT_URL)", show_default=False
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
Partitions = Annotated[
    int | None,
    typer.Option(
        "--partitions",
        help="Partitioned stream: <stream>:{0} … <stream>:{P-1} "
        "(env: STREAM_PARTITIONS; default 0, one stream)",
        show_default=False,
    ),
]
RedisClusterFlag = Annotated[
    bool | None,
    typer.Option(
        "--redis-cluster/--no-redis-cluster",
        help="REDIS_URL is a node of a Redis Cluster (env: REDIS_CLUSTER)",
        show_default=False,
    ),
]


def handle_errors(fn: F) -> F:
    """Turns a FilepipeError into one clear line on stderr and an exit code
    (2 for configuration, 1 otherwise); `--debug` shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        _setup_logging(debug)
        try:
            return fn(*args, **kwargs)
        except FilepipeError as e:
            if debug:
                raise
            typer.echo(f"error: {scrub(printable(str(e)))}", err=True)
            raise typer.Exit(2 if isinstance(e, ConfigError) else 1) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(debug: bool) -> None:
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


def settings_from(**overrides: Any) -> Settings:
    """Settings from the given options over the environment and `.env`."""
    return load_settings({k: v for k, v in overrides.items() if k != "debug"})


def _version(value: bool) -> None:
    if value:
        from . import _native

        typer.echo(f"filepipe {__version__} (extension {_native.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Move 'file uploaded' events from a Redis stream into PostgreSQL/TimescaleDB."""


@app.command("init-db")
@handle_errors
def init_db_cmd(
    pg_uri: PgUri = None,
    table: Table = None,
    stream: Stream = None,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain", help="Create a plain PostgreSQL table even where TimescaleDB is installed."
        ),
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
    debug: Debug = False,
) -> None:
    """Create the events table (a hypertable where TimescaleDB can be used), or upgrade one of
    the old layout (its rows are given the stream name). Idempotent."""
    from .db import init_db
    from .timescale import parse_interval

    s = settings_from(pg_uri=pg_uri, table=table, stream=stream)
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
        moved = f"{info.migrated_rows:,} rows moved into chunks"
        typer.echo(f"✓ Table {info.table} turned into a hypertable: {moved}")
    typer.echo(f"✓ Table {info.table} ready: {info.describe()} on {mask_url(s.pg_uri)}")
    for note in info.notes:
        typer.echo(note)


@app.command("drop-chunks")
@handle_errors
def drop_chunks_cmd(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Drop the chunks wholly older than this: 90d, 12w.")
    ],
    pg_uri: PgUri = None,
    table: Table = None,
    debug: Debug = False,
) -> None:
    """Drop a hypertable's chunks older than a retention window (TimescaleDB's drop_chunks): for
    editions without retention policies, run it from cron."""
    from .db import drop_old_chunks
    from .timescale import interval_words, parse_interval

    s = settings_from(pg_uri=pg_uri, table=table)
    window = parse_interval("--older-than", older_than)
    dropped = drop_old_chunks(s, window)
    if dropped:
        typer.echo(f"✓ Dropped {len(dropped)} chunks of {s.table} older than {interval_words(window)}")
    else:
        typer.echo(f"✓ No chunk of {s.table} is older than {interval_words(window)}")


@app.command()
@handle_errors
def produce(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or directories (walked recursively).", show_default=False)
    ],
    link: Annotated[
        bool, typer.Option("--link", help="Hard-link into local storage instead of copying.")
    ] = False,
    redis_url: RedisUrl = None,
    stream: Stream = None,
    storage_mode: StorageMode = None,
    local_storage_dir: LocalDir = None,
    s3_bucket: S3Bucket = None,
    s3_prefix: S3Prefix = None,
    s3_endpoint_url: S3Endpoint = None,
    partitions: Partitions = None,
    redis_cluster: RedisClusterFlag = None,
    debug: Debug = False,
) -> None:
    """Store files and enqueue one 'file uploaded' event per file."""
    from .producer import Producer

    s = settings_from(redis_url=redis_url, stream=stream, storage_mode=storage_mode,
                      local_storage_dir=local_storage_dir, s3_bucket=s3_bucket, s3_prefix=s3_prefix,
                      s3_endpoint_url=s3_endpoint_url, partitions=partitions, redis_cluster=redis_cluster)
    producer = Producer(s)
    try:
        n = _with_redis_errors(s, lambda: producer.produce(paths, link=link))
    finally:
        producer.close()
    where = f"{s.stream} ({s.partitions} partitions)" if s.partitions else s.stream
    typer.echo(f"✓ Enqueued {n} events to {where} ({producer.storage.describe()})")


def _with_redis_errors(s: Settings, fn: Callable[[], int]) -> int:
    import redis

    from .errors import TransientError

    try:
        return fn()
    except redis.ConnectionError as e:
        raise TransientError(f"cannot reach Redis at {mask_url(s.redis_url)}: {error_line(e)}") from e


@app.command()
@handle_errors
def consume(
    drain: Annotated[
        bool, typer.Option("--drain", help="Exit 0 once no new or pending entries are left.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Entries per batch (env: CONSUMER_BATCH_SIZE; default 5000)",
            show_default=False,
        ),
    ] = None,
    batch_bytes: Annotated[
        int | None,
        typer.Option(
            "--batch-bytes",
            help="Bytes of entries per batch, about: reads shrink when entries are big "
            "(env: FILEPIPE_BATCH_BYTES; default 16777216, 16 MiB)",
            show_default=False,
        ),
    ] = None,
    block_ms: Annotated[
        int | None,
        typer.Option(
            "--block-ms", help="XREADGROUP BLOCK (env: CONSUMER_BLOCK_MS; default 2000)", show_default=False
        ),
    ] = None,
    consumer_name: Annotated[
        str | None,
        typer.Option(
            "--consumer-name", help="Consumer name (env: CONSUMER_NAME; default host-pid)", show_default=False
        ),
    ] = None,
    claim_idle_ms: Annotated[
        int | None,
        typer.Option(
            "--claim-idle-ms",
            help="Reclaim entries idle this long (env: CLAIM_IDLE_MS; default 60000)",
            show_default=False,
        ),
    ] = None,
    max_deliveries: Annotated[
        int | None,
        typer.Option(
            "--max-deliveries",
            help="Dead-letter after this many deliveries (env: MAX_DELIVERIES; default 5)",
            show_default=False,
        ),
    ] = None,
    max_file_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-file-bytes", help="Largest file accepted (env: MAX_FILE_BYTES)", show_default=False
        ),
    ] = None,
    max_entry_fields: Annotated[
        int | None,
        typer.Option(
            "--max-entry-fields",
            help="Dead-letter an entry with more fields (env: FILEPIPE_MAX_ENTRY_FIELDS; default 1000)",
            show_default=False,
        ),
    ] = None,
    max_entry_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-entry-bytes",
            help="Dead-letter an entry with more bytes (env: FILEPIPE_MAX_ENTRY_BYTES; default 1048576)",
            show_default=False,
        ),
    ] = None,
    copy_format: Annotated[
        str | None,
        typer.Option("--copy-format", help="binary or text (env: FILEPIPE_COPY_FORMAT)", show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Serve Prometheus /metrics, /healthz, /readyz on this port.",
            show_default=False,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address for --metrics-port.")
    ] = "127.0.0.1",
    metrics_allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics-allowed-host",
            help="A Host name the metrics may be scraped by, besides loopback names and IP addresses "
            "(repeatable; *.example.com for its subdomains).",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            max=256,
            help="Run N worker processes (consumers <name>-0 … <name>-N-1) under one supervisor "
            "that restarts a crashed one and forwards SIGTERM/SIGINT; with --metrics-port P, "
            "worker i serves P+i.",
            show_default=False,
        ),
    ] = None,
    partitions: Partitions = None,
    redis_cluster: RedisClusterFlag = None,
    stream_retention: Annotated[
        str | None,
        typer.Option(
            "--stream-retention",
            help="Keep acknowledged entries for replay: a count (100000), an age (24h) or both "
            "(100000,24h: whichever is less), or 'all' (env: STREAM_RETENTION; default: none kept)",
            show_default=False,
        ),
    ] = None,
    pgbouncer: Annotated[
        bool | None,
        typer.Option(
            "--pgbouncer/--no-pgbouncer",
            help="PG_URI is PgBouncer in transaction pooling mode: keep no session state "
            "(env: FILEPIPE_PGBOUNCER)",
            show_default=False,
        ),
    ] = None,
    redis_url: RedisUrl = None,
    pg_uri: PgUri = None,
    stream: Stream = None,
    group: Group = None,
    table: Table = None,
    storage_mode: StorageMode = None,
    local_storage_dir: LocalDir = None,
    s3_bucket: S3Bucket = None,
    s3_prefix: S3Prefix = None,
    s3_endpoint_url: S3Endpoint = None,
    debug: Debug = False,
) -> None:
    """Consume the stream into PostgreSQL until stopped (SIGTERM/SIGINT finish the batch in hand)."""
    from .consumer import Consumer

    s = settings_from(
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        block_ms=block_ms,
        consumer_name=consumer_name,
        claim_idle_ms=claim_idle_ms,
        max_deliveries=max_deliveries,
        max_file_bytes=max_file_bytes,
        max_entry_fields=max_entry_fields,
        max_entry_bytes=max_entry_bytes,
        copy_format=copy_format,
        redis_url=redis_url,
        pg_uri=pg_uri,
        stream=stream,
        group=group,
        table=table,
        storage_mode=storage_mode,
        local_storage_dir=local_storage_dir,
        s3_bucket=s3_bucket,
        s3_prefix=s3_prefix,
        s3_endpoint_url=s3_endpoint_url,
        partitions=partitions,
        redis_cluster=redis_cluster,
        stream_retention=stream_retention,
        pgbouncer=pgbouncer,
    )
    from .metrics import check_host_names

    metrics_names = check_host_names(metrics_allowed_host or [])
    if processes is not None:
        from .supervisor import Supervisor

        worker_args = [*(["--quiet"] if quiet else []), *(["--debug"] if debug else []),
                       "--metrics-host", metrics_host]
        for name in metrics_names:
            worker_args += ["--metrics-allowed-host", name]
        supervisor = Supervisor(s, processes, drain=drain, worker_args=worker_args, metrics_port=metrics_port)
        raise typer.Exit(supervisor.run())
    where = f"{s.stream} ({s.partitions} partitions)" if s.partitions else s.stream
    logging.getLogger("filepipe").info(
        "consumer %s: %s group %s on %s -> %s on %s (batch %d)", s.consumer_name, where, s.group,
        mask_url(s.redis_url), s.table, mask_url(s.pg_uri), s.batch_size,
    )
    if s.batch_size < 500:
        logging.getLogger("filepipe").info(
            "CONSUMER_BATCH_SIZE=%d is small: every batch costs round trips to Redis and PostgreSQL; "
            "filepipe's default (%d) is much faster", s.batch_size, DEFAULT_BATCH_SIZE,
        )
    write = None if quiet else functools.partial(typer.echo)
    consumer = Consumer(s, drain=drain, write=write, install_signals=True)
    if metrics_port is not None:
        from .metrics import serve_metrics

        serve_metrics(metrics_port, metrics_host, consumer=consumer, allowed_hosts=metrics_names)
    stats = consumer.run()
    if not quiet:
        typer.echo(
            f"Stopped: {stats.inserted} inserted, {stats.duplicates} already present, "
            f"{stats.dead_lettered} dead-lettered, {stats.deleted} deleted while pending, "
            f"{stats.acked} acknowledged"
        )


@app.command()
@handle_errors
def demo(
    files: Annotated[
        int,
        typer.Option(
            "--files", min=1, max=1_000_000,
            help="Events for filepipe to drain (the guide's fast consumer gets a tenth, the old a 500th).",
        ),
    ] = 50_000,
    debug: Debug = False,
) -> None:
    """Run the whole pipeline once on sample files beside the guide's two consumers, with
    throwaway Redis and PostgreSQL unless REDIS_URL / PG_URI are set; on a terminal, then
    serve the dashboard until Enter."""
    from .demo import run_demo

    run_demo(files, echo=typer.echo)


def main() -> None:
    """Entry point of the `filepipe` script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


def _register_optional() -> None:
    """Commands that live in their own modules register themselves here."""
    import importlib

    for module in ("status", "diagnose", "dlq", "dashboard"):
        try:
            mod = importlib.import_module(f"filepipe.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"filepipe.{module}":
                raise
            continue
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(app, handle_errors)


_register_optional()
