"""Configuration: command-line options over environment variables over `.env` over defaults.

The environment names are the ones the performance guide's users already have in their
`.env` (`REDIS_URL`, `PG_URI`, `CONSUMER_BATCH_SIZE`, ...). Secrets are never printed:
use `mask_url` for a URL shown to a person, `redaction.error_line` for a library's error.

One module, a little over 500 lines, on purpose: `Settings` is the one table of every
setting (its environment name, option, default, help and bounds beside the field), and the
loading and checking below read that table; split, a setting's parts would live apart.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import constants as c
from .errors import ConfigError
from .observe.text import entries
from .redaction import mask_url as mask_url  # where every module has always found it
from .redaction import remember, url_secrets

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")


def default_consumer_name() -> str:
    """`<host>-<pid>`: unique per process, stable for the life of one."""
    return f"{socket.gethostname()}-{os.getpid()}"


def setting(
    default: Any = MISSING,
    *,
    env: str | tuple[str, ...],
    help: str,
    option: bool = True,
    shown: str | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A `Settings` field with what a person needs to know about it: its environment
    names (the first is the one filepipe writes; the others are read too, in order),
    whether it has a command-line option (`--field-name`), its help, and how its default
    is written when the code cannot show it (`shown`)."""
    meta = {"env": (env,) if isinstance(env, str) else env, "help": help, "option": option, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _hash_threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class Settings:
    """Everything a filepipe command needs to know. Build it with `load_settings`.

    Each field's metadata (`setting`) is the one place its environment name, option, help
    and default live: the command-line options, `filepipe config`, the README's
    configuration table and the supervisor's worker environment are derived from it."""

    redis_url: str = setting(c.DEFAULT_REDIS_URL, env="REDIS_URL", help="Redis URL")
    pg_uri: str = setting(
        c.DEFAULT_PG_URI, env=("PG_URI", "DATABASE_URL"), help="PostgreSQL URI (or a libpq key=value string)"
    )
    consumer_name: str = setting(
        env="CONSUMER_NAME", help="Consumer name", shown="<host>-<pid>", factory=default_consumer_name
    )
    batch_size: int = setting(c.DEFAULT_BATCH_SIZE, env="CONSUMER_BATCH_SIZE", help="Entries per batch")
    batch_bytes: int = setting(
        c.DEFAULT_BATCH_BYTES,
        env="FILEPIPE_BATCH_BYTES",
        help="Bytes of entries per batch, about: reads shrink when entries are big",
        shown=f"{c.DEFAULT_BATCH_BYTES} (16 MiB)",
    )
    block_ms: int = setting(c.DEFAULT_BLOCK_MS, env="CONSUMER_BLOCK_MS", help="XREADGROUP BLOCK, in ms")
    storage_mode: str = setting("local", env="STORAGE_MODE", help="Where files are: local or s3")
    local_storage_dir: str = setting(
        c.DEFAULT_LOCAL_STORAGE_DIR, env="LOCAL_STORAGE_DIR", help="Local storage root"
    )
    s3_bucket: str = setting("", env="S3_BUCKET", help="S3 bucket")
    s3_prefix: str = setting("", env="S3_PREFIX", help="S3 key prefix")
    s3_endpoint_url: str = setting("", env="S3_ENDPOINT_URL", help="S3-compatible endpoint (AWS when empty)")
    s3_max_concurrency: int = setting(
        16, env="S3_MAX_CONCURRENCY", option=False, help="Parallel S3 GETs per batch (and pooled connections)"
    )
    stream: str = setting(c.DEFAULT_STREAM, env=("STREAM_NAME", "FILEPIPE_STREAM"), help="Stream name")
    group: str = setting(c.DEFAULT_GROUP, env=("CONSUMER_GROUP", "FILEPIPE_GROUP"), help="Consumer group")
    dead_letter_stream: str = setting(
        "",
        env=("DEAD_LETTER_STREAM", "FILEPIPE_DEAD_LETTER_STREAM"),
        option=False,
        help="Dead-letter stream",
        shown="<stream>:dead",
    )
    table: str = setting(c.DEFAULT_TABLE, env="FILEPIPE_TABLE", help="Events table: table or schema.table")
    max_file_bytes: int = setting(
        c.DEFAULT_MAX_FILE_BYTES,
        env="MAX_FILE_BYTES",
        help="Largest file accepted",
        shown=f"{c.DEFAULT_MAX_FILE_BYTES} (100 MiB)",
    )
    # An entry with more fields, or more bytes (id, names and values), is dead-lettered.
    max_entry_fields: int = setting(
        c.DEFAULT_MAX_ENTRY_FIELDS,
        env="FILEPIPE_MAX_ENTRY_FIELDS",
        help="Dead-letter an entry with more fields",
    )
    max_entry_bytes: int = setting(
        c.DEFAULT_MAX_ENTRY_BYTES,
        env="FILEPIPE_MAX_ENTRY_BYTES",
        help="Dead-letter an entry with more bytes (id, field names and values)",
        shown=f"{c.DEFAULT_MAX_ENTRY_BYTES} (1 MiB)",
    )
    claim_idle_ms: int = setting(
        c.DEFAULT_CLAIM_IDLE_MS, env="CLAIM_IDLE_MS", help="Reclaim entries idle this long, in ms"
    )
    max_deliveries: int = setting(
        c.DEFAULT_MAX_DELIVERIES, env="MAX_DELIVERIES", help="Dead-letter an entry after this many deliveries"
    )
    hash_threads: int = setting(
        env="FILEPIPE_HASH_THREADS",
        option=False,
        help="Threads reading and hashing files",
        shown="CPU count, between 2 and 8",
        factory=_hash_threads,
    )
    copy_format: str = setting("binary", env="FILEPIPE_COPY_FORMAT", help="COPY format: binary or text")
    pool_size: int = setting(
        2,
        env="FILEPIPE_POOL_SIZE",
        option=False,
        help="PostgreSQL connections (doubled when a round trip to PostgreSQL takes 5 ms or more)",
    )
    in_flight: int = setting(
        2, env="FILEPIPE_IN_FLIGHT", option=False, help="Prepared batches waiting to load"
    )
    connect_timeout_s: float = setting(
        5.0, env="FILEPIPE_CONNECT_TIMEOUT", option=False, help="Connection timeout, in seconds"
    )
    statement_timeout_ms: int = setting(
        60_000, env="FILEPIPE_STATEMENT_TIMEOUT_MS", option=False, help="PostgreSQL statement timeout, in ms"
    )
    drain_timeout: float = setting(
        300.0,
        env="FILEPIPE_DRAIN_TIMEOUT",
        help="With --drain, give up (exit 1) on an outage this long, in seconds",
    )
    # 0: the single stream `<stream>`; P: `<stream>:{0}` ... `<stream>:{P-1}` (partitions.py).
    partitions: int = setting(
        0,
        env="STREAM_PARTITIONS",
        help="Partitioned stream: <stream>:{0} … <stream>:{P-1}",
        shown="0 (one stream)",
    )
    # Talk to a Redis Cluster (redis-py's RedisCluster, which follows MOVED/ASK).
    redis_cluster: bool = setting(False, env="REDIS_CLUSTER", help="REDIS_URL is a node of a Redis Cluster")
    # PostgreSQL is reached through PgBouncer in transaction pooling mode: no session state.
    pgbouncer: bool = setting(
        False,
        env="FILEPIPE_PGBOUNCER",
        help="PG_URI is PgBouncer in transaction pooling mode: keep no session state",
    )
    # What stays in the stream once every consumer group has acknowledged it (`Window`).
    stream_retention: str = setting(
        c.DEFAULT_STREAM_RETENTION,
        env="STREAM_RETENTION",
        help="Keep acknowledged entries for replay: a count (100000), an age (24h) or both "
        "(100000,24h: whichever is less), or 'all'",
        shown="none kept",
    )
    # How many dead letters (and of which age) each dead-letter stream keeps.
    dead_letter_retention: str = setting(
        c.DEFAULT_DEAD_LETTER_RETENTION,
        env="DEAD_LETTER_RETENTION",
        option=False,
        help="Dead letters kept per dead-letter stream: a count, an age, both, or 'all'",
    )
    # How log lines are written: `text` (time, level, consumer, message) or `json` (one object a line).
    log_format: str = setting(
        "text", env="FILEPIPE_LOG_FORMAT", help="Log lines as text, or json (one object a line)"
    )
    # The dashboard's login (HTTP basic authentication); required on a non-loopback address.
    dashboard_user: str = setting(
        "filepipe", env="FILEPIPE_DASHBOARD_USER", option=False, help="Dashboard login"
    )
    dashboard_password: str = setting(
        "",
        env="FILEPIPE_DASHBOARD_PASSWORD",
        option=False,
        help="Dashboard password: without one, no login and only a loopback address",
        shown="none",
    )

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


_FIELDS = {f.name: f for f in fields(Settings)}
# (setting, environment names in order of precedence), from the fields' metadata.
ENV_NAMES: dict[str, tuple[str, ...]] = {f.name: f.metadata["env"] for f in fields(Settings)}


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
        parts = [entries(self.count)] if self.count else []
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
    flag = option_name(name)
    if env and flag:
        return f"{env[0]} ({flag})"
    return env[0] if env else f"--{name.replace('_', '-')}"


def option_name(name: str) -> str | None:
    """The command-line option of setting `name` (`--batch-size`), None if it has none."""
    return f"--{name.replace('_', '-')}" if _FIELDS[name].metadata.get("option") else None


def shown_default(name: str) -> str:
    """The default of setting `name` as a person reads it: from the code, or from the
    field's `shown` text where the code computes it (`<host>-<pid>`)."""
    f = _FIELDS[name]
    if f.metadata.get("shown"):
        return str(f.metadata["shown"])
    if f.type in ("bool", bool):
        return "1" if f.default else "0"
    return "empty" if f.default == "" else str(f.default)


def describe_setting(name: str, help: str | None = None) -> str:
    """`Entries per batch (env: CONSUMER_BATCH_SIZE; default 5000)`: the help of its option
    (`help` instead of the field's own text, where a command uses the setting its own way)."""
    text = help or _FIELDS[name].metadata["help"]
    return f"{text} (env: {', '.join(ENV_NAMES[name])}; default {shown_default(name)})"


def settings_environment(settings: Settings) -> dict[str, str]:
    """`settings` as the environment variables `load_settings` reads back (the first name of each)."""
    env: dict[str, str] = {}
    for name, names in ENV_NAMES.items():
        value = getattr(settings, name)
        env[names[0]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


def find_dotenv(start: str | Path | None = None) -> Path | None:
    """The `.env` filepipe reads: the first one in the working directory or above it,
    as python-dotenv's `find_dotenv(usecwd=True)` finds it."""
    here = Path(start) if start is not None else Path.cwd()
    for directory in (here, *here.parents):
        candidate = directory / ".env"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Resolved:
    """Settings with where each value came from: `--flag`, `env NAME`, `.env NAME (path)`
    or `default`."""

    settings: Settings
    sources: dict[str, str]
    dotenv: Path | None


FIND: Any = object()  # `load_settings(dotenv_path=FIND)`: look for `.env` from the working directory up


def resolve_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = FIND,
) -> Resolved:
    """`load_settings`, saying where each value came from."""
    dotenv_file = find_dotenv() if dotenv_path is FIND else Path(dotenv_path) if dotenv_path else None
    if dotenv_file is not None and not dotenv_file.is_file():
        dotenv_file = None
    from_file: dict[str, str] = {}
    if dotenv_file is not None:
        from dotenv import dotenv_values

        from_file = {k: v for k, v in dotenv_values(dotenv_file).items() if v is not None}
    environment = os.environ if environ is None else environ

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, names in ENV_NAMES.items():
        sources[name] = "default"
        for origin, env in (("env", environment), (".env", from_file)):
            found = next((n for n in names if env.get(n, "").strip() != ""), None)
            if found is not None:
                values[name] = _convert(name, env[found], _FIELDS[name].type)
                sources[name] = f"env {found}" if origin == "env" else f".env {found} ({dotenv_file})"
                break
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _convert(name, value, _FIELDS[name].type)
        sources[name] = option_name(name) or name
    settings = Settings(**values)
    validate(settings)
    return Resolved(settings, sources, dotenv_file)


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = FIND,
) -> Settings:
    """Resolves settings: `overrides` (CLI options; None means unset), then the
    environment, then the `.env` file (by default the first in the working directory or
    above it; None: none), then defaults. Raises ConfigError on any invalid value, naming
    the variable."""
    return resolve_settings(overrides, environ, dotenv_path).settings


def validate(s: Settings) -> None:
    """Raises ConfigError with one clear line for the first invalid setting."""
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"REDIS_URL must start with redis://, rediss:// or unix://, not {mask_url(s.redis_url)!r}"
        )
    if not (s.pg_uri.startswith(("postgresql://", "postgres://")) or "=" in s.pg_uri):
        raise ConfigError(
            f"PG_URI must be a postgresql:// URL or a libpq key=value string, not {mask_url(s.pg_uri)!r}"
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
    if not s.drain_timeout > 0:
        raise ConfigError(f"{_label('drain_timeout')} must be more than 0 seconds, not {s.drain_timeout:g}")
    if not 0 < s.connect_timeout_s <= 600:
        raise ConfigError(f"{_label('connect_timeout_s')} must be between 0 and 600 seconds")
    if s.storage_mode not in ("local", "s3"):
        raise ConfigError(f"STORAGE_MODE must be 'local' or 's3', not {s.storage_mode!r}")
    if s.storage_mode == "s3" and not s.s3_bucket:
        raise ConfigError("STORAGE_MODE=s3 needs S3_BUCKET")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"{_label('log_format')} must be 'text' or 'json', not {s.log_format!r}")
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
