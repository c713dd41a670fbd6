"""A consumer's heartbeat: what it publishes about itself, beside each stream it reads.

The consumer writes one every HEARTBEAT_INTERVAL_S (and at once when an outage starts)
under `heartbeat_key(stream, name)` with a TTL of HEARTBEAT_TTL_S, and deletes it when it
stops cleanly. `filepipe status`, the dashboard and the housekeeper (which removes departed
consumers) read it. This module is the one definition of its content: `Heartbeat.to_json`
for the writer, `Heartbeat.from_json` for every reader. It imports nothing heavy, so that
the consumer can use it without importing the observers.

A reader meets heartbeats written by other versions: a field missing or of the wrong type
takes its default (a missing count is 0, a missing rate unknown), and a value that is not a
JSON object is no heartbeat at all (`from_json` returns None).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Heartbeat:
    """One consumer's figures since it started, as it published them. Times are its own
    clock's (`time.time()`): compare them with each other, not with another host's clock."""

    name: str = ""
    host: str = ""
    pid: int | None = None
    stream: str = ""  # the stream's name (a partitioned stream: its logical name)
    partitions: int = 0
    group: str = ""
    started: float = 0.0
    updated: float = 0.0  # when it was written
    inserted: int = 0  # rows it added to the table
    duplicates: int = 0  # redelivered entries whose row was already there
    dead_lettered: int = 0  # dead letters it wrote
    dead_letters_waiting: int = 0  # dead letters it holds until Redis takes writes again
    deleted: int = 0  # entries found deleted from the stream while pending
    batches: int = 0
    rate: float | None = None  # rows it added per second, since it started (None: not said)
    last_error: str = ""  # the outages it waits out now ("" when none)

    @property
    def loaded(self) -> int:
        """Entries it loaded into the table: new rows and redeliveries already present."""
        return self.inserted + self.duplicates

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Heartbeat | None:
        """The heartbeat in `raw` (a GET's reply); None when there is none or it is not a
        JSON object. Fields it lacks, or holds with the wrong type, take their defaults."""
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(doc, dict):
            return None
        values = {f.name: _typed(doc.get(f.name), f.type, f.default) for f in fields(cls)}
        return cls(**values)


def _typed(value: Any, kind: Any, default: Any) -> Any:
    """`value` if it fits the field's type (`kind`, as annotated), else `default`. An int
    fits a float; booleans are not numbers here, nor are NaN and the infinities."""
    if value is None or isinstance(value, bool):
        return default
    if kind == "str":
        return value if isinstance(value, str) else default
    if kind in ("int", "int | None"):
        return value if isinstance(value, int) else default
    if kind in ("float", "float | None"):
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else default
    raise TypeError(f"no rule for a heartbeat field of type {kind}")
