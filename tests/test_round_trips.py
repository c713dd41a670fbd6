"""Round trips on the way: each costs the network's round trip (20 ms and more to a cloud
service), so what can go together does. Counted on a recording proxy in front of a
private Redis: a round trip is a write of the client's that follows a reply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from filepipe.config import load_settings
from filepipe.embedded import RedisServer
from filepipe.stream import connect
from tests.support.proxy import TcpProxy


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
    with RedisServer() as rs:
        r = redis.Redis.from_url(rs.url)
        r.acl_setuser("app", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
        r.close()
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
