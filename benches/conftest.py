"""The benches use the test suite's services: FILEPIPE_TEST_REDIS_URL / FILEPIPE_TEST_PG_URI
(and FILEPIPE_TEST_TSDB_URI), or throwaway servers when they are unset."""

from tests.conftest import pg_uri, redis_url, tsdb_uri

__all__ = ["pg_uri", "redis_url", "tsdb_uri"]
