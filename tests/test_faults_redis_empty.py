"""Redis comes back empty: flushed, restarted without persistence, or the stream or the
group deleted by hand while consumers run. The consumer recreates the group (at 0: loads
are idempotent, so what is delivered again is only skipped) and goes on, saying once what
it found, in its log and to `filepipe status`.

Every test runs its own redis-server, so flushing it touches nothing else."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.workload import seed, wait_for
from tests.test_faults_redis import Site

from filepipe.consumer import Consumer, Stats
from filepipe.embedded import RedisServer
from filepipe.status import collect_status, render


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def site(redis_server: RedisServer, pg_uri: str, tmp_path: Path) -> Iterator[Site]:
    s = Site(redis_server, pg_uri, tmp_path)
    yield s
    s.close()


class Running:
    """A consumer (not draining) in a thread."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.stats: Stats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stats = self.consumer.run()
        except BaseException as e:
            self.error = e

    def stop(self) -> Stats:
        self.consumer.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats


def flushall(site: Site) -> None:
    site.redis.flushall()


def delete_stream(site: Site) -> None:
    site.redis.delete(site.settings.stream)


def destroy_group(site: Site) -> None:
    site.redis.xgroup_destroy(site.settings.stream, site.settings.group)


EMPTIED: dict[str, Callable[[Site], None]] = {
    "flushall": flushall,
    "stream deleted": delete_stream,
    "group destroyed": destroy_group,
}


@pytest.mark.parametrize("how", list(EMPTIED))
def test_redis_emptied_while_consuming_is_recovered(
    how: str, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="filepipe")
    s = site.settings
    first = seed(site.redis, s, site.storage, 300)
    running = Running(Consumer(s, write=None))
    try:
        wait_for(lambda: site.rows() == 300, 60, "the first events to load")
        EMPTIED[how](site)
        second = seed(site.redis, s, site.storage, 300)
        wait_for(
            lambda: site.rows() >= 600 or not running.thread.is_alive(), 60, "the events after it to load"
        )
    finally:
        stats = running.stop()
    assert site.rows() == 600
    assert set(first.ids).isdisjoint(second.ids)
    # What was delivered again (the group destroyed: the stream from its start) only counted
    # as already present.
    assert stats.inserted == 600
    assert site.redis.xpending(s.stream, s.group)["pending"] == 0
    found = [r.getMessage() for r in caplog.records if "recreated" in r.getMessage()]
    assert len(found) == 1, found
    assert s.group in found[0] and s.stream in found[0]
    # status tells of it, after the consumer is gone too: when, by whom, what Redis said.
    st = collect_status(s)
    assert st.redis is not None and st.redis.group_recreated is not None
    recreated = st.redis.group_recreated
    assert recreated.consumer == s.consumer_name and recreated.stream == s.stream
    assert recreated.reason.startswith(("NOGROUP", "UNBLOCKED")), recreated.reason
    assert recreated.age_s < 60
    line = next(line for line in render(st).splitlines() if "Group recreated" in line)
    assert s.consumer_name in line and recreated.reason in line, line
