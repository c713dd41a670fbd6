"""The heartbeat's one JSON form: what the consumer writes, every reader reads back, and
heartbeats of other versions or of nobody's making are read without a failure."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import Env

from filepipe.constants import heartbeat_key
from filepipe.consumer import Consumer
from filepipe.heartbeat import Heartbeat

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "name",
    "host",
    "pid",
    "stream",
    "partitions",
    "group",
    "started",
    "updated",
    "inserted",
    "duplicates",
    "dead_lettered",
    "dead_letters_waiting",
    "deleted",
    "batches",
    "rate",
    "last_error",
]


def test_round_trip() -> None:
    beat = Heartbeat(
        name="w1",
        host="h",
        pid=42,
        stream="s",
        partitions=3,
        group="g",
        started=1.5,
        updated=2.5,
        inserted=7,
        duplicates=2,
        dead_lettered=1,
        dead_letters_waiting=4,
        deleted=3,
        batches=5,
        rate=12.25,
        last_error="PostgreSQL: down",
    )
    assert Heartbeat.from_json(beat.to_json()) == beat
    assert Heartbeat.from_json(beat.to_json().encode()) == beat
    assert sorted(json.loads(beat.to_json())) == sorted(FIELDS)
    assert beat.loaded == 9


def test_an_older_heartbeat_reads_with_defaults() -> None:
    """The fields a heartbeat had before duplicates were published."""
    old = {
        "name": "w",
        "host": "h",
        "pid": 1,
        "updated": 10,
        "inserted": 5,
        "dead_lettered": 1,
        "batches": 2,
        "rate": 3,
        "last_error": "",
    }
    beat = Heartbeat.from_json(json.dumps(old))
    assert beat is not None
    assert (beat.name, beat.pid, beat.updated, beat.inserted, beat.rate) == ("w", 1, 10.0, 5, 3.0)
    assert (beat.duplicates, beat.deleted, beat.stream, beat.started) == (0, 0, "", 0.0)
    assert Heartbeat.from_json("{}") == Heartbeat()
    assert Heartbeat().rate is None and Heartbeat().pid is None


def test_malformed_values_take_their_defaults() -> None:
    raw = {
        "name": 7,
        "host": None,
        "pid": "12",
        "inserted": 2.5,
        "rate": "fast",
        "updated": True,
        "batches": -1,
        "last_error": ["x"],
        "started": float("nan"),
        "extra": {"nested": 1},
    }
    beat = Heartbeat.from_json(json.dumps(raw))
    assert beat == Heartbeat(batches=-1)
    for text in ("", "not json", "[1, 2]", "null", "3", '"text"', b"\xff\xfe"):
        assert Heartbeat.from_json(text) is None, text
    assert Heartbeat.from_json(None) is None


@given(JSON)
def test_any_json_reads_without_failing(doc: Any) -> None:
    beat = Heartbeat.from_json(json.dumps(doc))
    assert (beat is None) == (not isinstance(doc, dict))
    if beat is not None:
        assert isinstance(beat.name, str) and isinstance(beat.inserted, int)
        assert beat.rate is None or isinstance(beat.rate, float)
        assert Heartbeat.from_json(beat.to_json()) == beat


def test_what_a_running_consumer_writes(env: Env) -> None:
    for i in range(3):
        env.write_file(f"h/{i}.txt", b"x")
        env.xadd(
            {"file_id": f"00000000-0000-4000-8000-00000000000{i}", "filename": f"{i}", "key": f"h/{i}.txt"}
        )
    consumer = Consumer(env.settings, write=None)
    thread = threading.Thread(target=consumer.run, daemon=True)
    started = time.time()
    thread.start()
    try:
        key = heartbeat_key(env.settings.stream, env.settings.consumer_name)
        deadline = time.monotonic() + 30
        beat = None
        while time.monotonic() < deadline:
            beat = Heartbeat.from_json(env.redis.get(key))
            if beat is not None and beat.inserted == 3:
                break
            time.sleep(0.2)
    finally:
        consumer.stop()
        thread.join(30)
    assert beat is not None and beat.inserted == 3 and beat.duplicates == 0
    assert (beat.name, beat.stream, beat.group) == (
        env.settings.consumer_name,
        env.settings.stream,
        env.settings.group,
    )
    assert started - 5 <= beat.started <= beat.updated <= time.time()
    assert beat.rate is not None and beat.rate > 0 and beat.batches >= 1
    assert env.redis.get(key) is None  # a clean stop removes it
