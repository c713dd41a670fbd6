"""The fixtures are pytest plugins in tests/fixtures/ (loaded by pyproject's addopts):
`services.py` (the Redis, PostgreSQL and TimescaleDB servers) and `env.py` (each test's own
stream and table). Test modules import `Env` and the table markers from here or from there."""

from tests.fixtures.env import HYPERTABLE, PLAIN, Env, both_tables, on_hypertable

__all__ = ["HYPERTABLE", "PLAIN", "Env", "both_tables", "on_hypertable"]
