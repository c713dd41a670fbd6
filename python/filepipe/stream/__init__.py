"""Redis stream and consumer-group operations, one function per round trip.

In the order a batch meets Redis: `client` (connecting; what a failure means; replies as
text), `group` (creating the group; what it holds pending), `read` (XREADGROUP, and pages of
a stream for the observers), `reply` (XREADGROUP replies handed to the extension as the
bytes Redis sent), `dead` (what a dead letter holds of its entry), `ack` (the atomic
acknowledgement that writes the dead letters), `heartbeats`. Every name is importable from
`filepipe.stream` itself.
"""

from __future__ import annotations

from .ack import AckResult, ack
from .client import connect, failure, group_missing, is_cluster, reply_text
from .dead import (
    FIELDS_DROPPED,
    INCOMPLETE_MARKERS,
    ORIGINAL_FIELDS,
    REASON_CODES,
    TRUNCATED_FIELD,
    DeadLetter,
    dead_letter_fields,
    excerpt,
)
from .group import (
    ensure_group,
    group_info,
    group_row,
    id_key,
    note_recreated,
    pending_count,
    pending_counts,
    still_pending,
)
from .heartbeats import set_heartbeats
from .read import (
    Entries,
    Entry,
    Fields,
    ReadSize,
    claim_and_read_new,
    entries_bytes,
    fields_dict,
    read_new,
    read_own_pending,
    read_own_pending_and_new,
    read_pages,
)

__all__ = [
    "FIELDS_DROPPED",
    "INCOMPLETE_MARKERS",
    "ORIGINAL_FIELDS",
    "REASON_CODES",
    "TRUNCATED_FIELD",
    "AckResult",
    "DeadLetter",
    "Entries",
    "Entry",
    "Fields",
    "ReadSize",
    "ack",
    "claim_and_read_new",
    "connect",
    "dead_letter_fields",
    "ensure_group",
    "entries_bytes",
    "excerpt",
    "failure",
    "fields_dict",
    "group_info",
    "group_missing",
    "group_row",
    "id_key",
    "is_cluster",
    "note_recreated",
    "pending_count",
    "pending_counts",
    "read_new",
    "read_own_pending",
    "read_own_pending_and_new",
    "read_pages",
    "reply_text",
    "set_heartbeats",
    "still_pending",
]
