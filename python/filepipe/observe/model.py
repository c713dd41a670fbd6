"""What the observers know of the pipeline at one instant: plain dataclasses, filled by
the readers (`streams`, `dead`, `table`, `retained`), judged by `health`, rendered by
`filepipe status`, the dashboard and `/metrics`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .retained import RetentionState, retention_json


@dataclass
class ConsumerState:
    """One member of the group, with what its heartbeat says (see `health.consumer_state`)."""

    name: str
    pending: int
    idle_s: float
    host: str | None = None
    pid: int | None = None
    rate: float | None = None  # files/s since it started (`rates.SINCE_START`)
    inserted: int | None = None
    loaded: int | None = None  # new rows and redeliveries already present
    dead_lettered: int | None = None
    batches: int | None = None
    updated: float | None = None  # when it wrote its heartbeat, by its own clock
    last_error: str = ""
    heartbeat_age_s: float | None = None  # by the Redis clock; None: no heartbeat
    state: str = ""  # live | waiting | stale | dead (departed ones are not listed: `health.CONSUMER_STATES`)
    silent: bool = False  # dead with entries pending for CLAIM_IDLE_MS or longer
    heartbeat_stream: str = ""  # the (partition) stream whose heartbeat key it writes


@dataclass
class PendingEntry:
    id: str
    consumer: str
    age_s: float
    idle_s: float
    deliveries: int
    stream: str = ""


@dataclass
class GroupRecreation:
    """The last time a consumer found the group missing and created it again
    (`constants.group_recreated_key`)."""

    stream: str
    consumer: str
    reason: str  # Redis's reply that told it (NOGROUP …, UNBLOCKED …)
    age_s: float  # by the Redis clock


@dataclass
class PartitionState:
    stream: str
    length: int
    lag: int | None
    pending: int
    dead_total: int
    group_exists: bool


@dataclass
class StreamState:
    stream: str = ""
    exists: bool = False
    length: int = 0
    last_entry_id: str = ""
    last_entry_age_s: float | None = None
    entries_added: int | None = None
    group_exists: bool = False
    lag: int | None = None
    lag_capped: bool = False
    entries_read: int | None = None
    waiting_age_s: float | None = None  # the oldest entry not yet delivered
    pending: int = 0
    oldest_pending: PendingEntry | None = None
    arrivals_last_minute: int = 0
    arrivals_capped: bool = False
    consumers: list[ConsumerState] = field(default_factory=list)  # departed ones left out
    departed: int = 0  # group members with no heartbeat and nothing pending (they left)
    dead_total: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    dead_counted: int = 0  # dead letters whose reason was read
    dead_last_minute: int = 0
    dead_last_minute_by_reason: dict[str, int] = field(default_factory=dict)
    groups_missing: list[str] = field(default_factory=list)  # streams with entries and no group
    writes_refused: str = ""  # why Redis refuses writes now (a read-only replica, a failed snapshot)
    group_recreated: GroupRecreation | None = None  # within GROUP_RECREATED_TTL_S (the latest)
    partitions: list[PartitionState] = field(default_factory=list)  # STREAM_PARTITIONS > 0


@dataclass
class TableState:
    exists: bool = False
    rows_total: int = 0
    rows_estimated: bool = False
    rows_last_minute: int = 0
    rows_last_hour: int = 0
    recent_limited_to_day: bool = False  # large table: recent rows counted among the last day's events
    # Its kind, TimescaleDB figures and rate history (`timescale.TableFigures.to_json`).
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Rows per second over the last minute (`rates.LAST_MINUTE`)."""
        return self.rows_last_minute / 60


@dataclass
class Status:
    """The whole pipeline at one instant, and its health (`health.assess`)."""

    stream_name: str
    group: str
    table: str
    dead_stream: str
    redis_url: str
    pg_uri: str
    taken_at: str  # ISO 8601, UTC
    redis: StreamState | None = None
    events: TableState | None = None
    retention: RetentionState | None = None
    partitions: int = 0
    redis_error: str = ""
    pg_error: str = ""
    health: str = "healthy"  # healthy | degraded | unreachable
    unreachable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.health == "healthy" else 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        if self.events is not None:
            d["events"]["throughput"] = self.events.throughput
        if self.retention is not None:
            d["retention"] = retention_json(self.retention)
        return d
