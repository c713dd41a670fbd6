"""TimescaleDB detected from the catalog: what `init-db` makes of each state of the server."""

from __future__ import annotations

import psycopg
import pytest

from filepipe import timescale
from filepipe.errors import ConfigError, NotPreloadedError
from filepipe.timescale import Extension, table_kind

ABSENT = Extension()
AVAILABLE = Extension(available="2.28.3", preloaded=True, preload_libraries="timescaledb")
INSTALLED = Extension(available="2.28.3", installed="2.28.3", preloaded=True, preload_libraries="timescaledb")
NOT_PRELOADED = Extension(available="2.28.3", preload_libraries="")


def test_a_server_without_timescaledb_gets_a_plain_table() -> None:
    assert ABSENT.state == "absent" and not ABSENT.usable
    assert table_kind(ABSENT, plain=False) == timescale.PLAIN
    assert table_kind(ABSENT, plain=True) == timescale.PLAIN


def test_a_server_that_preloads_it_gets_a_hypertable_unless_plain_is_asked() -> None:
    for ext in (AVAILABLE, INSTALLED):
        assert ext.usable
        assert table_kind(ext, plain=False) == timescale.HYPERTABLE
        assert table_kind(ext, plain=True) == timescale.PLAIN
    assert (AVAILABLE.state, INSTALLED.state) == ("available", "installed")
    # Read by a role that may not see shared_preload_libraries: the loader's own setting tells.
    assert table_kind(Extension(available="2.28.3", preloaded=True), plain=False) == timescale.HYPERTABLE


def test_installed_but_not_preloaded_is_refused_with_what_to_change() -> None:
    assert NOT_PRELOADED.state == "not preloaded" and not NOT_PRELOADED.usable
    with pytest.raises(NotPreloadedError) as raised:
        table_kind(NOT_PRELOADED, plain=False)
    assert isinstance(raised.value, ConfigError)  # exit 2, one line
    assert str(raised.value) == (
        "TimescaleDB 2.28.3 is installed on this server but not preloaded: set shared_preload_libraries = "
        "'timescaledb' in postgresql.conf (it is empty now) and restart PostgreSQL (a reload is not enough); "
        "or run `filepipe init-db --plain` to create a plain table instead"
    )
    assert table_kind(NOT_PRELOADED, plain=True) == timescale.PLAIN


def test_the_advice_keeps_the_libraries_already_preloaded() -> None:
    others = Extension(available="2.28.3", preload_libraries="pg_stat_statements")
    assert "(it is now 'pg_stat_statements': keep those libraries and add timescaledb)" in (
        others.preload_advice()
    )
    hidden = Extension(available="2.28.3", preload_libraries=None)  # a role that may not read it
    assert hidden.preload_advice() == (
        "set shared_preload_libraries = 'timescaledb' in postgresql.conf and restart PostgreSQL "
        "(a reload is not enough)"
    )


def test_a_database_that_has_the_extension_but_no_loader_is_refused_even_for_a_plain_table() -> None:
    """Every statement touching TimescaleDB's objects would end the session there."""
    broken = Extension(available="2.28.3", installed="2.27.0", preload_libraries="")
    for plain in (False, True):
        with pytest.raises(NotPreloadedError, match=r"^TimescaleDB 2\.27\.0 is created in this database but"):
            table_kind(broken, plain=plain)


def test_the_facts_are_read_from_the_server(pg_uri: str) -> None:
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        ext = timescale.read_extension(conn)
        available = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()
    assert ext.available == (available[0] if available else "")
    assert ext.preload_libraries == (preload[0] if preload else None)
    assert ext.preloaded == ("timescaledb" in (ext.preload_libraries or ""))
