"""Every Redis key, stream and group name, and every default, in one place."""

from __future__ import annotations

DEFAULT_STREAM = "file_uploads"
DEFAULT_GROUP = "file_processors"
DEAD_LETTER_SUFFIX = ":dead"
# Beside each stream (in its hash slot): the ids of its entries already dead-lettered.
DEAD_LETTER_IDS_SUFFIX = ":dead-letter-ids"
DEFAULT_TABLE = "file_events"
STAGING_TABLE = "filepipe_staging"

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_PG_URI = "postgresql://localhost:5432/postgres"

# The guide's consumer used 10 and then 50; larger batches amortise every round trip.
DEFAULT_BATCH_SIZE = 5000
# Bytes of stream entries per batch, about. A batch of 5000 typical entries (300-500 bytes:
# a uuid, a name, a key, a few attributes) is under 2.5 MB, so this never cuts one short
# unless entries average over 3 KiB; it keeps a consumer of big entries (a large attribute
# each) at a few hundred MB, with a handful of batches in the pipeline, each held as the
# reply, the parsed batch and the COPY buffer.
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024
# What the readers that sample a stream (status, the dashboard, dlq) ask for at once, in
# bytes, about; and how much `status` reads at most to count arrivals or dead letters by
# reason (past it, the counts are shown as lower bounds).
SAMPLE_PAGE_BYTES = 4 * 1024 * 1024
STATUS_SCAN_BYTES = 64 * 1024 * 1024
DEFAULT_BLOCK_MS = 1000
DEFAULT_MAX_FILE_BYTES = 100 * 1024 * 1024
DEFAULT_CLAIM_IDLE_MS = 60_000
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_LOCAL_STORAGE_DIR = "./uploads"
# Per-entry caps. The contract has eight fields and the producer adds a few attributes;
# a thousand fields and a mebibyte leave ample room for rich metadata, while keeping
# the parse of one entry under a millisecond and a batch of them within memory.
DEFAULT_MAX_ENTRY_FIELDS = 1000
DEFAULT_MAX_ENTRY_BYTES = 1024 * 1024
# A dead letter holds its entry whole up to the consumer's caps (FILEPIPE_MAX_ENTRY_FIELDS,
# FILEPIPE_MAX_ENTRY_BYTES), and at least up to these (the default caps); a larger entry's
# dead letter holds an excerpt: at most that many of its fields and bytes, each value (and
# name) over DEAD_LETTER_EXCERPT_BYTES cut to that many bytes. Its `truncated` field says
# what was cut.
DEAD_LETTER_MAX_FIELDS = DEFAULT_MAX_ENTRY_FIELDS
DEAD_LETTER_MAX_BYTES = DEFAULT_MAX_ENTRY_BYTES
DEAD_LETTER_EXCERPT_BYTES = 1024
# Rows refused one by one the same way (SQLSTATE and constraint or message) with none
# loading between them: from this many on it is the table's rule, not the entries, even
# when the table still takes its newest row again (a rule that only new rows break): the
# consumer waits instead of dead-lettering every entry.
SAME_REFUSALS_FOR_THE_TABLE = 10

HEARTBEAT_PREFIX = "filepipe:consumer:"
HEARTBEAT_TTL_S = 30
# A consumer writes its heartbeat this often (and at once when an outage starts); while
# the key exists (HEARTBEAT_TTL_S), the consumer is live (`observe.health`).
HEARTBEAT_INTERVAL_S = 2.0
# A consumer that found its group missing and created it again says so under
# `group_recreated_key` for this long (`filepipe status` shows it).
GROUP_RECREATED_PREFIX = "filepipe:recreated:"
GROUP_RECREATED_TTL_S = 86_400

# Trimming (retention/). A running consumer trims each stream every TRIM_INTERVAL_S, and
# sooner once it has acknowledged TRIM_AFTER_ENTRIES entries since its last pass; a lease
# of TRIM_LEASE_MS per stream keeps N consumers from trimming it at the same moment.
TRIM_LEASE_PREFIX = "filepipe:trim:"
RETENTION_MARKS_PREFIX = "filepipe:retention:"
ARRIVALS_PREFIX = "filepipe:arrivals:"
ARRIVALS_KEEP_MS = 150_000  # samples of entries added, for status's "arrived in the last minute"
ARRIVALS_SLACK_MS = 15_000  # a sample this much older than the minute still measures it
TRIM_INTERVAL_S = 2.0
TRIM_AFTER_ENTRIES = 10_000
TRIM_LEASE_MS = 500
# How often a consumer looks for departed consumers of its group (to remove them).
DEPARTED_CHECK_S = 10.0
# STREAM_RETENTION: "" keeps only what some consumer group has not acknowledged yet.
DEFAULT_STREAM_RETENTION = ""
# The environment variable `consume --processes` tells each worker its index in.
WORKER_ENV = "FILEPIPE_WORKER"
DEFAULT_DEAD_LETTER_RETENTION = "10000"
# Shares at which status warns: of the dead-letter cap, and of Redis's maxmemory.
DEAD_LETTER_WARN_SHARE = 0.8
MEMORY_WARN_SHARE = 0.8


def dead_letter_stream(stream: str) -> str:
    """The dead-letter stream of `stream`: `file_uploads` -> `file_uploads:dead`."""
    return stream + DEAD_LETTER_SUFFIX


def dead_letter_ids_key(stream: str) -> str:
    """The sorted set of the entry ids of `stream` that have been dead-lettered (zero-padded,
    so that they sort as ids do), which makes a dead letter exactly-once per entry even when the
    consumer group is destroyed and created again: `file_uploads:dead-letter-ids`,
    `file_uploads:{3}:dead-letter-ids`. The acknowledgement script keeps it bounded: it
    drops the ids older than the stream's first entry, which can never be delivered again."""
    return stream + DEAD_LETTER_IDS_SUFFIX


def partition_stream(stream: str, index: int) -> str:
    """Partition `index` of `stream`: `file_uploads:{3}`. The braces are a Redis Cluster
    hash tag, so the partition, its dead letters and its heartbeats share one hash slot."""
    return f"{stream}:{{{index}}}"


def partition_dead_stream(stream: str, index: int) -> str:
    """The dead-letter stream of partition `index`: `file_uploads:{3}:dead`."""
    return partition_stream(stream, index) + DEAD_LETTER_SUFFIX


def partition_id_prefix(index: int) -> str:
    """What goes before a partition's entry ids in the `stream_id` column (`{3}/`), so
    that the same entry id in two partitions makes two keys."""
    return f"{{{index}}}/"


def heartbeat_key(stream: str, consumer: str) -> str:
    """The Redis key where a consumer of `stream` publishes its liveness."""
    return f"{HEARTBEAT_PREFIX}{stream}:{consumer}"


def group_recreated_key(stream: str, group: str) -> str:
    """Where the last consumer that found `group` of `stream` missing (Redis flushed or
    restarted without persistence, the stream or the group deleted) and created it again
    says so: a JSON object, `{"consumer": …, "reason": …}` (Redis's reply that told it),
    kept GROUP_RECREATED_TTL_S; what is left of its TTL says when."""
    return f"{GROUP_RECREATED_PREFIX}{stream}:{group}"


def trim_lease_key(stream: str) -> str:
    """The lease a consumer holds while it trims `stream` (`filepipe:trim:file_uploads:{3}`:
    in the partition's hash slot, like everything else that belongs to it)."""
    return f"{TRIM_LEASE_PREFIX}{stream}"


def retention_marks_key(stream: str) -> str:
    """With a count in STREAM_RETENTION: a sorted set of (entries added so far -> last
    entry id) marks, from which the trim point of "keep the newest N" is read."""
    return f"{RETENTION_MARKS_PREFIX}{stream}"


def arrivals_key(stream: str) -> str:
    """Samples (time -> entries added so far) that each trim writes: a trimmed stream no
    longer shows what arrived in the last minute, these do."""
    return f"{ARRIVALS_PREFIX}{stream}"


def trim_keys(stream: str) -> list[str]:
    """Every key the trimming keeps beside `stream` (to remove with a scratch stream)."""
    return [trim_lease_key(stream), retention_marks_key(stream), arrivals_key(stream)]
