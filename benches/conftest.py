"""The benches use the test suite's services (the plugin tests/fixtures/services.py, loaded by
pyproject's addopts): FILEPIPE_TEST_REDIS_URL / FILEPIPE_TEST_PG_URI (and FILEPIPE_TEST_TSDB_URI),
or throwaway servers when they are unset."""
