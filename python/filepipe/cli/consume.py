"""`filepipe consume`: the stream into PostgreSQL, in this process or in `--processes N` workers."""

from __future__ import annotations

import gc
import logging
import os
from typing import Annotated

import typer

from ..config import Settings, mask_url
from ..constants import DEFAULT_BATCH_SIZE, WORKER_ENV
from ..observe.text import plural
from .app import app, line_writer, log_as
from .options import LAYOUT, PIPELINE, POSTGRES, REDIS, STORAGE, command

TUNING = (
    "batch_size",
    "batch_bytes",
    "block_ms",
    "consumer_name",
    "claim_idle_ms",
    "max_deliveries",
    "max_file_bytes",
    "max_entry_fields",
    "max_entry_bytes",
    "copy_format",
)


@command(
    app,
    "consume",
    settings=(
        *TUNING,
        *LAYOUT,
        "stream_retention",
        "pgbouncer",
        "log_format",
        "drain_timeout",
        *REDIS,
        *POSTGRES,
        *PIPELINE,
        *STORAGE,
    ),
)
def consume(
    s: Settings,
    drain: Annotated[
        bool, typer.Option("--drain", help="Exit 0 once no new or pending entries are left.")
    ] = False,
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
    debug: bool = False,
) -> None:
    """Consume the stream into PostgreSQL until stopped (SIGTERM/SIGINT finish the batch in hand)."""
    metrics_names: list[str] = []
    if metrics_allowed_host:
        from ..observe.export import check_host_names

        metrics_names = check_host_names(metrics_allowed_host)
    if processes is not None:
        from ..supervisor import Supervisor

        log_as(s.consumer_name, "supervisor")
        worker_args = [
            *(["--quiet"] if quiet else []),
            *(["--debug"] if debug else []),
            "--metrics-host",
            metrics_host,
        ]
        for name in metrics_names:
            worker_args += ["--metrics-allowed-host", name]
        supervisor = Supervisor(s, processes, drain=drain, worker_args=worker_args, metrics_port=metrics_port)
        gc.enable()  # (off while `python -m filepipe consume` starts: see filepipe.__main__)
        raise typer.Exit(supervisor.run())
    from ..consumer import Consumer

    # A worker of `--processes` is told its index by the supervisor.
    log_as(s.consumer_name, os.environ.get(WORKER_ENV))
    write = line_writer(s.log_format)

    log = logging.getLogger("filepipe")
    where = f"{s.stream} ({s.partitions} {plural(s.partitions, 'partition')})" if s.partitions else s.stream
    log.info(
        "consuming %s, group %s, on %s -> %s on %s (batch %d)",
        where,
        s.group,
        mask_url(s.redis_url),
        s.table,
        mask_url(s.pg_uri),
        s.batch_size,
    )
    if s.batch_size < 500:
        log.info(
            "CONSUMER_BATCH_SIZE=%d is small: every batch costs round trips to Redis and PostgreSQL; "
            "filepipe's default (%d) is much faster",
            s.batch_size,
            DEFAULT_BATCH_SIZE,
        )
    consumer = Consumer(s, drain=drain, write=None if quiet else write, install_signals=True)
    if metrics_port is not None:
        from ..observe.export import serve_metrics

        serve_metrics(metrics_port, metrics_host, consumer=consumer, allowed_hosts=metrics_names)
    # What the hot path allocates dies with its batch; collecting every 700 new objects
    # walked the batches in flight and took a fifth of the CPU (python -m benches.profile).
    # Cycles are still collected, less often; what start-up made is left out of it (the
    # collector is off while `python -m filepipe consume` starts: see filepipe.__main__).
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    gc.enable()
    try:
        stats = consumer.run()
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
    if not quiet or stats.abandoned:
        write(stats.summary())
