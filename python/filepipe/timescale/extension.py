"""TimescaleDB as this server has it: detected from the catalog, never assumed.

A server can offer the extension (its files are installed) without being able to use it:
TimescaleDB's loader must be in `shared_preload_libraries`, which takes a restart, and
until then `CREATE EXTENSION timescaledb` ends the session with `extension "timescaledb"
must be preloaded`. That is the state after a plain package install. `read_extension`
gathers the facts in one round trip; `table_kind` decides from them what `init-db` makes.

Two editions exist: the Apache-2 one (hypertables, chunks, `drop_chunks`, `time_bucket`)
and the Timescale-License one, which adds compression, continuous aggregates and
policies (jobs). `license_of` says which one a database runs (`apache` or `timescale`);
everything that needs the second asks first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg

from ..errors import NotPreloadedError

EXTENSION = "timescaledb"
FULL_LICENSE = "timescale"  # the edition with compression, continuous aggregates and policies

# The loader defines `timescaledb.disable_load` in every backend when it is preloaded:
# readable by any role, unlike shared_preload_libraries (superuser-only on most servers).
_EXTENSION_SQL = """
SELECT
  (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'),
  (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
  current_setting('timescaledb.disable_load', true) IS NOT NULL,
  (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries')
"""


@dataclass(frozen=True)
class Extension:
    """What the server and the current database say about TimescaleDB."""

    available: str = ""  # the version the server can install ("" when it has no such extension)
    installed: str = ""  # the version created in this database ("" when not created)
    preloaded: bool = False  # its loader is in shared_preload_libraries (loaded at server start)
    preload_libraries: str | None = None  # shared_preload_libraries; None when this role may not read it

    @property
    def usable(self) -> bool:
        """Whether this database can have (or has) hypertables."""
        return bool(self.available or self.installed) and self.preloaded

    @property
    def state(self) -> str:
        """`absent`, `not preloaded`, `available` (can be created) or `installed`."""
        if not (self.available or self.installed):
            return "absent"
        if not self.preloaded:
            return "not preloaded"
        return "installed" if self.installed else "available"

    def preload_advice(self) -> str:
        """What to change on the server, in words (one clause)."""
        current = self.preload_libraries
        if current is None:
            now = ""
        elif current.strip():
            now = f" (it is now '{current}': keep those libraries and add timescaledb)"
        else:
            now = " (it is empty now)"
        return (
            f"set shared_preload_libraries = '{EXTENSION}' in postgresql.conf{now} "
            "and restart PostgreSQL (a reload is not enough)"
        )

    def describe(self) -> str:
        """The extension's state in words, for status and the benchmark."""
        if self.state == "absent":
            return "not installed on this server"
        if self.state == "not preloaded":
            return f"{self.available or self.installed} installed but not preloaded: {self.preload_advice()}"
        if self.state == "available":
            return f"{self.available} available (not created in this database)"
        return self.installed


def read_extension(conn: psycopg.Connection[Any]) -> Extension:
    """The extension's facts for the database `conn` is connected to (one query)."""
    row = conn.execute(_EXTENSION_SQL).fetchone()
    if row is None:
        return Extension()
    return Extension(
        available=str(row[0] or ""),
        installed=str(row[1] or ""),
        preloaded=bool(row[2]),
        preload_libraries=None if row[3] is None else str(row[3]),
    )


PLAIN = "plain"
HYPERTABLE = "hypertable"


def table_kind(ext: Extension, *, plain: bool) -> str:
    """What `init-db` creates: `hypertable` where TimescaleDB can be used, `plain` where the
    server has no TimescaleDB or `plain` is asked for. Raises NotPreloadedError when the
    extension is installed but not preloaded and no plain table was asked for (a plain table
    made there by default would have to be migrated once the server is fixed), and always
    when the database already has the extension but the server does not load it (nothing
    touching TimescaleDB's objects can run there)."""
    if ext.installed and not ext.preloaded:
        raise NotPreloadedError(
            f"TimescaleDB {ext.installed} is created in this database but the server does not preload "
            f"it, so its tables cannot be used: {ext.preload_advice()}"
        )
    if plain or ext.state == "absent":
        return PLAIN
    if not ext.preloaded:
        raise NotPreloadedError(
            f"TimescaleDB {ext.available} is installed on this server but not preloaded: "
            f"{ext.preload_advice()}; or run `filepipe init-db --plain` to create a plain table instead"
        )
    return HYPERTABLE


def license_of(conn: psycopg.Connection[Any]) -> str:
    """`apache` or `timescale` (the edition in use in this database), "" without the extension."""
    row = conn.execute("SELECT current_setting('timescaledb.license', true)").fetchone()
    return str(row[0]) if row and row[0] else ""


def version_tuple(version: str) -> tuple[int, ...]:
    """`2.28.3` → (2, 28, 3); what does not parse counts 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.\-]", version)[:3])
