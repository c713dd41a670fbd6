"""Round trips on the way: each costs the network's round trip (20 ms and more to a cloud
service), so what can go together does. Counted on a recording proxy in front of a
private Redis: a round trip is a write of the client's that follows a reply."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest
import redis
from benches.e2e import port_of, with_port
from tests.fixtures.env import Env
from tests.support.proxy import TcpProxy

from filepipe.config import load_settings
from filepipe.embedded import RedisServer
from filepipe.stream import connect


def round_trips(proxy: TcpProxy) -> int:
    """The client's writes that waited for a reply (the first one too), on one connection."""
    assert proxy.chunks is not None
    trips, last = 0, ""
    for _at, way, _data in proxy.chunks:
        if way == "up" and last != "up":
            trips += 1
        last = way
    return trips


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """User `app` (password `right`) may do anything."""
    with RedisServer(extra_args=["--user", "app", "on", ">right", "~*", "&*", "+@all"]) as rs:
        yield rs


@pytest.mark.parametrize(
    ("userinfo", "db"), [("", 0), ("", 3), ("app:right@", 0), ("app:right@", 5)], ids=str
)
def test_a_connection_logs_in_in_one_round_trip(server: RedisServer, userinfo: str, db: int) -> None:
    with TcpProxy(server.port, record=True) as proxy:
        url = f"redis://{userinfo}127.0.0.1:{proxy.port}/{db}"
        r = connect(load_settings({"redis_url": url}, environ={}, dotenv_path=None))
        try:
            assert r.ping()
            assert round_trips(proxy) == 2  # the handshake, then the PING
            info = r.client_info()
        finally:
            r.close()
    assert (info["name"], int(info["db"]), info["user"]) == ("filepipe", db, "app" if userinfo else "default")
    assert int(info["resp"]) == 3


def test_a_refused_login_in_one_round_trip_is_the_server_s_reason(server: RedisServer) -> None:
    url = f"redis://app:wrong@127.0.0.1:{server.port}/2"
    r = connect(load_settings({"redis_url": url}, environ={}, dotenv_path=None))
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        r.ping()
    r.close()


def waves(proxies: list[TcpProxy], rtt: float) -> int:
    """The round trips a run waited for, all connections together: the client's writes,
    in time order, split where none went out for most of a round trip."""
    sent = sorted(at for p in proxies for at, way, _ in p.chunks or [] if way == "up")
    return 1 + sum(1 for a, b in itertools.pairwise(sent) if b - a > 0.6 * rtt)


@pytest.mark.parametrize(("events", "most"), [(0, 10), (300, 17)])
def test_a_drain_waits_on_few_round_trips(env: Env, events: int, most: int) -> None:
    """Behind 100 ms each way, the round trips a drain waits for. Empty: PostgreSQL's login
    (a TLS handshake, on a server with TLS; Redis's handshake, the group, the first
    heartbeat and the departed consumers' check meanwhile), the table, the reads of
    pending and of new entries (together), the look at what is pending, the last trim
    (with the heartbeat's removal), the goodbyes. With events: the reads growing from a
    first one the byte budget allows, the claim of idle entries sent with one, the COPY,
    the commit, the acknowledgements."""
    env.write_file("a.txt", b"a\n")
    for _ in range(events):
        env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})
    s = env.settings
    delay = 0.1
    with (
        TcpProxy(port_of(s.redis_url), delay_ms=delay * 1000, record=True) as rp,
        TcpProxy(port_of(s.pg_uri), delay_ms=delay * 1000, record=True) as pp,
    ):
        stats = env.drain(redis_url=with_port(s.redis_url, rp.port), pg_uri=with_port(s.pg_uri, pp.port))
        trips = waves([rp, pp], 2 * delay)
    assert stats.inserted == env.rows() == events
    assert trips <= most, trips
