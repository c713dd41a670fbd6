"""Connecting to Redis, and what its failures mean."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from ..config import Settings
from ..errors import ConfigError, FilepipeError, TransientError
from ..redaction import error_line, mask_url
from ..retry import TlsMismatch, redis_login_refusal
from . import reply


def connect(settings: Settings, *, socket_timeout: float | None = None) -> redis.Redis:
    """A client for `settings.redis_url` whose socket timeout outlasts a blocking read:
    a `RedisCluster` (which follows MOVED and ASK redirections) with REDIS_CLUSTER=1.
    `rediss://` URLs use TLS; their `ssl_*` query parameters are passed to redis-py.

    Replies stay bytes: the extension parses them without decoding twice."""
    timeout = (
        socket_timeout
        if socket_timeout is not None
        else settings.block_ms / 1000 + max(2.0, settings.connect_timeout_s)
    )
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": timeout,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 30,
        # No silent retries inside redis-py: a command whose reply was lost may have run
        # (an XADD twice, a read delivered), so the caller decides what is safe to repeat.
        "retry": Retry(NoBackoff(), retries=0),
        "retry_on_timeout": False,
        "client_name": "filepipe",
        **_HANDSHAKE,
    }
    scheme = urlsplit(settings.redis_url).scheme
    if scheme in _CONNECTIONS and not settings.redis_cluster:
        options["connection_class"] = _CONNECTIONS[scheme]
    parser, packer = reply.parser_class(), reply.command_packer()
    if parser is not None and packer is not None and not settings.redis_cluster:
        # XREADGROUP replies read in place, commands packed in one call (stream.reply).
        options["parser_class"] = parser
        options["command_packer"] = packer
    client = (
        _connect_cluster(settings, options)
        if settings.redis_cluster
        else redis.Redis.from_url(settings.redis_url, **options)
    )
    # The extension reads entries' fields straight from the flat [name, value, …]
    # lists the server sends: turning each entry into a dict first would be wasted work.
    client.set_response_callback("XREADGROUP", _raw_reply)
    return client


def _handshake() -> dict[str, Any]:
    """Options that leave out round trips redis-py makes on every new connection, before its
    first command, for what filepipe does not use: CLIENT SETINFO (two), and from redis-py 7
    the CLIENT MAINT_NOTIFICATIONS handshake (notices of a managed service's planned
    maintenance, which filepipe's own backoff waits out like any outage)."""
    options: dict[str, Any] = {}
    try:
        from redis.driver_info import DriverInfo  # noqa: F401 (redis-py 7.1+)

        options["driver_info"] = None
    except ImportError:
        options["lib_name"] = options["lib_version"] = None
    try:
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    except ImportError:
        pass
    return options


_HANDSHAKE = _handshake()


def _raw_reply(response: Any, **_options: Any) -> Any:
    return response


def reply_text(value: Any) -> str:
    """A reply from Redis as text (bytes decoded, invalid UTF-8 replaced)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class OneTripHandshake:
    """A connection's handshake in one round trip: redis-py sends each of its commands and
    waits for its reply (a PING before the first, when health checks are on, then HELLO,
    CLIENT SETNAME, SELECT: three or four round trips before the first command, each 20 ms
    on a cloud network). Here they go in one write, `HELLO 3 AUTH … SETNAME …` under RESP3,
    and their replies are read after; the handshake's reply checks the connection's health.
    A handshake this does not cover (a credential provider, maintenance notifications,
    client library info, redis-py's pure-Python RESP2 parser) is redis-py's own."""

    def on_connect_check_health(self, check_health: bool = True) -> None:
        conn: Any = self
        if not _one_trip_handshake(conn):
            super().on_connect_check_health(check_health=check_health)  # type: ignore[misc]
            return
        reset = getattr(conn, "_reset_himport_state", None)
        if reset is not None:
            reset()
        conn._parser.on_connect(conn)
        commands: list[tuple[Any, ...]] = []
        auth: tuple[Any, ...] = ()
        if conn.username or conn.password:
            auth = (conn.username or "default", conn.password or "")
        if conn.protocol == 3:
            hello: tuple[Any, ...] = ("HELLO", 3)
            if auth:
                hello += ("AUTH", *auth)
            if conn.client_name:
                hello += ("SETNAME", conn.client_name)
            commands.append(hello)
        else:
            if auth:
                # One argument (the password alone) is what servers before 6.0 accept.
                commands.append(("AUTH", *auth) if conn.username else ("AUTH", auth[1]))
            if conn.client_name:
                commands.append(("CLIENT", "SETNAME", conn.client_name))
        if conn.db:
            commands.append(("SELECT", conn.db))
        # One write (redis-py sends each piece of a packed list on its own).
        conn.send_packed_command(
            [b"".join(piece for command in commands for piece in conn.pack_command(*command))],
            check_health=False,
        )
        replies: list[Any] = []
        failure: BaseException | None = None
        for _ in commands:  # every reply is read, so that the first failure is the one raised
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as e:
                failure = failure or e
                replies.append(None)
        if failure is not None:
            raise failure
        if conn.protocol == 3:
            conn.handshake_metadata = replies[0]
        conn.next_health_check = time.monotonic() + conn.health_check_interval


def _one_trip_handshake(conn: Any) -> bool:
    """Whether `conn`'s handshake is one OneTripHandshake makes: user and password (or
    neither), a name, a database, and nothing else."""
    from redis._parsers import _RESP2Parser, _RESP3Parser

    if getattr(conn, "credential_provider", None) is not None or conn.protocol not in (2, 3):
        return False
    if isinstance(conn._parser, (_RESP2Parser, _RESP3Parser)):
        return False  # (redis-py swaps its pure-Python parsers during its own handshake)
    maint = getattr(conn, "maint_notifications_config", None)
    if maint is not None and maint.enabled:
        return False
    driver = getattr(conn, "driver_info", None)
    if driver is not None and (driver.formatted_name or driver.lib_version):
        return False
    return not (getattr(conn, "lib_name", None) or getattr(conn, "lib_version", None))


class PlainConnection(OneTripHandshake, redis.Connection):
    """A connection without TLS that tells a server speaking only TLS from an outage. Such
    a server cuts a plain connection off at its first bytes (a reset, no reply), as a
    server going away might; when that happens, one TLS handshake with it tells which it
    is, and a server that speaks only TLS raises TlsMismatch (permanent: exit 2)."""

    def on_connect_check_health(self, check_health: bool = True) -> None:
        try:
            super().on_connect_check_health(check_health=check_health)
        except redis.ConnectionError as e:
            if _cut_off(e) and speaks_tls(self.host, self.port, self.socket_connect_timeout):
                raise TlsMismatch(f"{self.host}:{self.port} speaks only TLS: use a rediss:// URL") from e
            raise


class TlsConnection(OneTripHandshake, redis.SSLConnection):
    """A TLS connection that tells a server without TLS from an outage. Such a server
    waits for the end of a command that the handshake's bytes never give, so the
    handshake times out as with a server too busy to answer; when it does, one plain
    PING tells which it is, and a server that answers it raises TlsMismatch (permanent)."""

    def _connect(self) -> socket.socket:
        try:
            sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        except (TimeoutError, ssl.SSLError) as e:
            if speaks_plain_redis(self.host, self.port, self.socket_connect_timeout):
                raise TlsMismatch(f"{self.host}:{self.port} does not speak TLS: use a redis:// URL") from e
            raise
        return sock

    def _wrap_socket_with_ssl(self, sock: socket.socket) -> socket.socket:
        # The handshake is part of connecting: it waits the connect timeout, not that of
        # a reply (which outlasts a blocking read).
        sock.settimeout(self.socket_connect_timeout)
        tls: socket.socket = super()._wrap_socket_with_ssl(sock)  # type: ignore[no-untyped-call]
        tls.settimeout(self.socket_timeout)
        return tls


_CONNECTIONS: dict[str, type[redis.Connection]] = {"redis": PlainConnection, "rediss": TlsConnection}


def _cut_off(e: redis.ConnectionError) -> bool:
    """Whether the server closed or reset the connection instead of replying."""
    cause = e.__cause__ or e.__context__
    return isinstance(cause, (ConnectionResetError, BrokenPipeError)) or "closed by server" in str(e)


def speaks_tls(host: str, port: int, timeout: float | None) -> bool:
    """Whether the server at `host:port` answers a TLS handshake (its certificate is not
    checked: this only asks which protocol it speaks). A TLS alert (a client certificate
    it wants, a version it will not do) is TLS too; plain bytes back are not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout or 5.0) as sock,
            context.wrap_socket(sock),
        ):
            return True
    except ssl.SSLError as e:
        return "ALERT" in (e.reason or "").upper()
    except OSError:
        return False


def speaks_plain_redis(host: str, port: int, timeout: float | None) -> bool:
    """Whether the server at `host:port` answers a plain inline PING as Redis does (`+PONG`,
    or an error such as `-NOAUTH`)."""
    try:
        with socket.create_connection((host, port), timeout=timeout or 5.0) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply[:1] in (b"+", b"-") and reply.endswith(b"\r\n")


def _connect_cluster(settings: Settings, options: dict[str, Any]) -> redis.Redis:
    from redis.cluster import RedisCluster

    try:
        # Asks the node for the cluster's layout: it must answer now.
        cluster = RedisCluster.from_url(settings.redis_url, **options)
    except (redis.RedisError, RedisClusterException) as e:
        where = mask_url(settings.redis_url)
        raise TransientError(f"cannot reach Redis Cluster at {where}: {error_line(e)}") from e
    return cluster  # type: ignore[return-value]


def is_cluster(r: redis.Redis) -> bool:
    """Whether `r` is a Redis Cluster client."""
    from redis.cluster import RedisCluster

    return isinstance(r, RedisCluster)


def group_missing(e: BaseException) -> bool:
    """Whether Redis refused a command because the consumer group (or its stream) is
    not there: Redis was flushed or restarted without persistence, or the stream or the
    group was deleted (a blocked read is woken with UNBLOCKED then)."""
    if not isinstance(e, redis.ResponseError):
        return False
    text = str(e)
    return "NOGROUP" in text or text.startswith("UNBLOCKED")


def failure(settings: Settings, e: redis.RedisError) -> FilepipeError:
    """What a command says when Redis failed it: a ConfigError (exit 2) with Redis's own
    reason when it refused the login or the database for good, else a TransientError."""
    where = mask_url(settings.redis_url)
    refusal = redis_login_refusal(e)
    if refusal is not None:
        return ConfigError(f"Redis at {where} refused the connection: {refusal} (check REDIS_URL)")
    return TransientError(f"cannot reach Redis at {where}: {error_line(e)}")
