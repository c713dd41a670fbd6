"""Configuration: command-line options over environment variables over `.env` over defaults.

The environment names are the ones the seed's users already have in their `.env`
(`REDIS_URL`, `PG_URI`, `CONSUMER_BATCH_SIZE`, ...). Secrets are never printed:
use `mask_url` for a URL shown to a person, `redaction.error_line` for a library's error.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import constants as c
from .errors import ConfigError
from .redaction import mask_url as mask_url  # where every module has always found it
from .redaction import remember, url_secrets

# (setting, environment names in order of precedence)
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "redis_url": ("REDIS_URL",),
    "pg_uri": ("PG_URI", "DATABASE_URL"),
    "consumer_name": ("CONSUMER_NAME",),
    "batch_size": ("CONSUMER_BATCH_SIZE",),
    "batch_bytes": ("FILEPIPE_BATCH_BYTES",),
    "block_ms": ("CONSUMER_BLOCK_MS",),
    "storage_mode": ("STORAGE_MODE",),
    "local_storage_dir": ("LOCAL_STORAGE_DIR",),
    "s3_bucket": ("S3_BUCKET",),
    "s3_prefix": ("S3_PREFIX",),
    "s3_endpoint_url": ("S3_ENDPOINT_URL",),
    "s3_max_concurrency": ("S3_MAX_CONCURRENCY",),
    "stream": ("STREAM_NAME", "FILEPIPE_STREAM"),
    "group": ("CONSUMER_GROUP", "FILEPIPE_GROUP"),
    "dead_letter_stream": ("DEAD_LETTER_STREAM", "FILEPIPE_DEAD_LETTER_STREAM"),
    "table": ("FILEPIPE_TABLE",),
    "max_file_bytes": ("MAX_FILE_BYTES",),
    "max_entry_fields": ("FILEPIPE_MAX_ENTRY_FIELDS",),
    "max_entry_bytes": ("FILEPIPE_MAX_ENTRY_BYTES",),
    "claim_idle_ms": ("CLAIM_IDLE_MS",),
    "max_deliveries": ("MAX_DELIVERIES",),
    "hash_threads": ("FILEPIPE_HASH_THREADS",),
    "copy_format": ("FILEPIPE_COPY_FORMAT",),
    "pool_size": ("FILEPIPE_POOL_SIZE",),
    "in_flight": ("FILEPIPE_IN_FLIGHT",),
    "connect_timeout_s": ("FILEPIPE_CONNECT_TIMEOUT",),
    "statement_timeout_ms": ("FILEPIPE_STATEMENT_TIMEOUT_MS",),
    "partitions": ("STREAM_PARTITIONS",),
    "redis_cluster": ("REDIS_CLUSTER",),
    "pgbouncer": ("FILEPIPE_PGBOUNCER",),
    "dashboard_user": ("FILEPIPE_DASHBOARD_USER",),
    "dashboard_password": ("FILEPIPE_DASHBOARD_PASSWORD",),
    "stream_retention": ("STREAM_RETENTION",),
    "dead_letter_retention": ("DEAD_LETTER_RETENTION",),
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")


def default_consumer_name() -> str:
    """`<host>-<pid>`: unique per process, stable for the life of one."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """Everything a filepipe command needs to know. Build it with `load_settings`."""

    redis_url: str = c.DEFAULT_REDIS_URL
    pg_uri: str = c.DEFAULT_PG_URI
    consumer_name: str = field(default_factory=default_consumer_name)
    batch_size: int = c.DEFAULT_BATCH_SIZE
    batch_bytes: int = c.DEFAULT_BATCH_BYTES
    block_ms: int = c.DEFAULT_BLOCK_MS
    storage_mode: str = "local"
    local_storage_dir: str = c.DEFAULT_LOCAL_STORAGE_DIR
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_max_concurrency: int = 16
    stream: str = c.DEFAULT_STREAM
    group: str = c.DEFAULT_GROUP
    dead_letter_stream: str = ""
    table: str = c.DEFAULT_TABLE
    max_file_bytes: int = c.DEFAULT_MAX_FILE_BYTES
    # An entry with more fields, or more bytes (id, names and values), is dead-lettered.
    max_entry_fields: int = c.DEFAULT_MAX_ENTRY_FIELDS
    max_entry_bytes: int = c.DEFAULT_MAX_ENTRY_BYTES
    claim_idle_ms: int = c.DEFAULT_CLAIM_IDLE_MS
    max_deliveries: int = c.DEFAULT_MAX_DELIVERIES
    hash_threads: int = field(default_factory=lambda: max(2, min(8, os.cpu_count() or 2)))
    copy_format: str = "binary"
    pool_size: int = 2
    in_flight: int = 2
    connect_timeout_s: float = 5.0
    statement_timeout_ms: int = 60_000
    # 0: the single stream `<stream>`; P: `<stream>:{0}` ... `<stream>:{P-1}` (partitions.py).
    partitions: int = 0
    # Talk to a Redis Cluster (redis-py's RedisCluster, which follows MOVED/ASK).
    redis_cluster: bool = False
    # PostgreSQL is reached through PgBouncer in transaction pooling mode: no session state.
    pgbouncer: bool = False
    # What stays in the stream once every consumer group has acknowledged it (`Window`).
    stream_retention: str = c.DEFAULT_STREAM_RETENTION
    # How many dead letters (and of which age) each dead-letter stream keeps.
    dead_letter_retention: str = c.DEFAULT_DEAD_LETTER_RETENTION
    # The dashboard's login (HTTP basic authentication); required on a non-loopback address.
    dashboard_user: str = "filepipe"
    dashboard_password: str = ""

    def __post_init__(self) -> None:
        # Whatever filepipe later shows of a client library's message, these stay out of it.
        remember(s for url in (self.redis_url, self.pg_uri, self.s3_endpoint_url) for s in url_secrets(url))
        remember([self.dashboard_password])

    @property
    def stream_window(self) -> Window:
        """STREAM_RETENTION, parsed."""
        return parse_window("stream_retention", self.stream_retention)

    @property
    def dead_window(self) -> Window:
        """DEAD_LETTER_RETENTION, parsed."""
        return parse_window("dead_letter_retention", self.dead_letter_retention)

    @property
    def dead_stream(self) -> str:
        """The dead-letter stream, `<stream>:dead` unless set explicitly."""
        return self.dead_letter_stream or c.dead_letter_stream(self.stream)

    def public(self) -> dict[str, Any]:
        """The settings as a dict that is safe to print: URLs have their passwords masked."""
        d = asdict(self)
        for key in ("redis_url", "pg_uri", "s3_endpoint_url"):
            d[key] = mask_url(d[key])
        d["dead_letter_stream"] = self.dead_stream
        if d["dashboard_password"]:
            d["dashboard_password"] = "***"
        return d


@dataclass(frozen=True)
class Window:
    """How much of a stream is kept once nothing needs it any more: at most the newest
    `count` entries (0: no count limit) and at most `age_s` seconds of them (0: no age
    limit); an entry goes as soon as either limit says so. `keep_all`: nothing is ever
    trimmed. No limit at all: nothing is kept."""

    count: int = 0
    age_s: int = 0
    keep_all: bool = False

    @property
    def keeps_nothing(self) -> bool:
        return not (self.count or self.age_s or self.keep_all)

    @property
    def age_text(self) -> str:
        """The age limit as written back: `90m`, `24h`, `7d`."""
        return _age_text(self.age_s)

    def describe(self) -> str:
        """`100,000 entries`, `24h`, `100,000 entries or 24h, whichever is less`, `everything`."""
        if self.keep_all:
            return "everything"
        parts = [f"{self.count:,} entries"] if self.count else []
        if self.age_s:
            parts.append(self.age_text)
        if not parts:
            return "nothing acknowledged"
        return parts[0] if len(parts) == 1 else f"{parts[0]} or {parts[1]}, whichever is less"


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WINDOW_PART = re.compile(r"^(\d+)([smhd]?)$")


def _age_text(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        if seconds % _AGE_UNITS[unit] == 0:
            return f"{seconds // _AGE_UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_window(name: str, text: str) -> Window:
    """`""`, `0` or `none`: keep nothing; `all`: keep everything; `100000`: a count;
    `24h` (s, m, h, d): an age; `100000,24h`: both. Raises ConfigError naming the setting."""
    raw = text.strip().lower()
    if raw in ("", "0", "none"):
        return Window()
    if raw == "all":
        return Window(keep_all=True)
    count = age = 0
    for part in raw.split(","):
        m = _WINDOW_PART.match(part.strip())
        twice = m is not None and bool(age if m.group(2) else count)
        if m is None or int(m.group(1)) == 0 or twice:
            raise ConfigError(
                f"{ENV_NAMES[name][0]} must be a count of entries (100000), an age (24h; s, m, h or d), "
                f"both (100000,24h), 'all' or 'none', not {text!r}"
            )
        if m.group(2):
            age = int(m.group(1)) * _AGE_UNITS[m.group(2)]
        else:
            count = int(m.group(1))
    return Window(count=count, age_s=age)


def _convert(name: str, raw: Any, target: type | str) -> Any:
    kind = target if isinstance(target, str) else target.__name__
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{_label(name)} must be 1 or 0 (true or false), not {raw!r}")
    if kind == "int":
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{_label(name)} must be a whole number, not {raw!r}") from None
    if kind == "float":
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{_label(name)} must be a number, not {raw!r}") from None
    return str(raw).strip()


def _label(name: str) -> str:
    env = ENV_NAMES.get(name)
    return f"{env[0]} (--{name.replace('_', '-')})" if env else f"--{name.replace('_', '-')}"


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = ".env",
) -> Settings:
    """Resolves settings: `overrides` (CLI options; None means unset), then the
    environment, then the `.env` file, then defaults. Raises ConfigError on any
    invalid value, naming the variable."""
    env: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    env.update(os.environ if environ is None else environ)

    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(Settings)}
    for name, names in ENV_NAMES.items():
        for env_name in names:
            if env.get(env_name, "").strip() != "":
                values[name] = _convert(name, env[env_name], types[name])
                break
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in types:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(name, value, types[name])
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Raises ConfigError with one clear line for the first invalid setting."""
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"REDIS_URL must start with redis://, rediss:// or unix://, not {mask_url(s.redis_url)!r}"
        )
    if not (s.pg_uri.startswith(("postgresql://", "postgres://")) or "=" in s.pg_uri):
        raise ConfigError(
            "PG_URI must be a postgresql:// URL or a libpq key=value string, "
            f"not {mask_url(s.pg_uri)!r}"
        )
    positive = {
        "batch_size": (1, 100_000),
        "batch_bytes": (64 * 1024, 1 << 40),
        "max_file_bytes": (1, 1 << 62),
        # An entry needs three fields (file_id, filename, key) and some bytes for them.
        "max_entry_fields": (3, 100_000_000),
        "max_entry_bytes": (256, 1 << 40),
        "max_deliveries": (1, 1_000_000),
        "hash_threads": (1, 64),
        "s3_max_concurrency": (1, 256),
        "pool_size": (1, 100),
        "in_flight": (1, 16),
        "statement_timeout_ms": (1, 86_400_000),
    }
    for name, (low, high) in positive.items():
        value = getattr(s, name)
        if not low <= value <= high:
            raise ConfigError(f"{_label(name)} must be between {low} and {high}, not {value}")
    if not 0 <= s.partitions <= 1024:
        raise ConfigError(f"{_label('partitions')} must be between 0 and 1024, not {s.partitions}")
    if s.partitions and s.dead_letter_stream:
        raise ConfigError(
            "DEAD_LETTER_STREAM cannot be set with STREAM_PARTITIONS: the dead letters of partition i "
            "go to <stream>:{i}:dead, in the partition's own hash slot"
        )
    if s.redis_cluster and s.redis_url.startswith("unix://"):
        raise ConfigError("REDIS_CLUSTER=1 needs a redis:// or rediss:// URL of one of the cluster's nodes")
    if s.redis_cluster and not s.partitions:
        raise ConfigError(
            "REDIS_CLUSTER=1 needs STREAM_PARTITIONS of 1 or more: a stream and its dead letters "
            "must share a hash slot, which partition names (<stream>:{i}) guarantee"
        )
    if not 0 <= s.block_ms <= 3_600_000:
        raise ConfigError(f"{_label('block_ms')} must be between 0 and 3600000, not {s.block_ms}")
    if s.claim_idle_ms < 1000:
        raise ConfigError(f"{_label('claim_idle_ms')} must be at least 1000, not {s.claim_idle_ms}")
    if not 0 < s.connect_timeout_s <= 600:
        raise ConfigError(f"{_label('connect_timeout_s')} must be between 0 and 600 seconds")
    if s.storage_mode not in ("local", "s3"):
        raise ConfigError(f"STORAGE_MODE must be 'local' or 's3', not {s.storage_mode!r}")
    if s.storage_mode == "s3" and not s.s3_bucket:
        raise ConfigError("STORAGE_MODE=s3 needs S3_BUCKET")
    if s.copy_format not in ("binary", "text"):
        raise ConfigError(f"FILEPIPE_COPY_FORMAT must be 'binary' or 'text', not {s.copy_format!r}")
    if not _IDENT.match(s.table):
        raise ConfigError(f"FILEPIPE_TABLE must be a plain [schema.]table name, not {s.table!r}")
    s.stream_window  # noqa: B018 (parses: raises ConfigError)
    if s.dead_window.keeps_nothing:
        raise ConfigError(
            f"DEAD_LETTER_RETENTION must keep something: a count (10000), an age (7d), "
            f"both, or 'all', not {s.dead_letter_retention!r}"
        )
    if not s.dashboard_user or ":" in s.dashboard_user or any(ch.isspace() for ch in s.dashboard_user):
        raise ConfigError(
            f"FILEPIPE_DASHBOARD_USER must be a name without ':' or spaces, not {s.dashboard_user!r}"
        )
    for name in ("stream", "group", "consumer_name"):
        value = getattr(s, name)
        if not value or len(value) > 200 or any(ch.isspace() for ch in value):
            raise ConfigError(f"{_label(name)} must be 1-200 characters without spaces, not {value!r}")
