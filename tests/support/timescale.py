"""A private PostgreSQL cluster that preloads TimescaleDB, for the hypertable tests.

`make timescaledb` installs the extension into the machine's PostgreSQL when it is
missing (the shared build script); `FILEPIPE_TEST_TSDB_URI` names a server that
already preloads it instead (each test uses its own table there)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psycopg

from filepipe.embedded import PostgresServer, timescaledb_installed

ENV_URI = "FILEPIPE_TEST_TSDB_URI"
MISSING = (
    "TimescaleDB is not installed for this machine's PostgreSQL: run `make timescaledb` "
    f"(it builds the Apache-2 edition), or set {ENV_URI} to a server that preloads it"
)


@contextlib.contextmanager
def timescaledb_uri() -> Iterator[str]:
    """The URI of a server whose databases can create the timescaledb extension: the one
    `FILEPIPE_TEST_TSDB_URI` names, else a private cluster started with
    `shared_preload_libraries = 'timescaledb'`. Raises RuntimeError when neither can be."""
    uri = os.environ.get(ENV_URI)
    if uri:
        yield uri
        return
    if not timescaledb_installed():
        raise RuntimeError(MISSING)
    with PostgresServer(preload=("timescaledb",)) as server:
        yield server.uri


def describe(uri: str) -> str:
    """`TimescaleDB 2.28.3 (apache) at …`, for the pytest header."""
    with psycopg.connect(uri, connect_timeout=3, autocommit=True) as conn:
        row = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
    return f"timescaledb: {row[0] if row else 'not available'} at {uri}"
